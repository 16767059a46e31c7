"""Where the MLflow store is: the project root from any folder of the repo and from DVC's temporary experiment
workspaces; a copied or moved repo's store rewritten to point into itself."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.config import PipelineError, parse_params


def make_repo(root: Path) -> Path:
    (root / ".dvc").mkdir(parents=True)
    (root / "params.yaml").write_text("seed: 1\n")
    return root


def test_project_root_from_subfolders_and_dvc_temp_workspaces(tmp_path, monkeypatch):
    root = make_repo(tmp_path / "repo")
    (root / "pipeline" / "models").mkdir(parents=True)
    assert tracking.workspace_root(root / "pipeline" / "models") == root
    assert tracking.project_root(root / "pipeline" / "models") == root
    # DVC 3 copies the repo into <root>/.dvc/tmp/exps/<tmpdir> (--temp) or .../exps/celery/<id>/<tmpdir> (queue)
    for inner in ("tmp4k2x", "celery/ab12cd/tmpq9z"):
        workspace = make_repo(root / ".dvc" / "tmp" / "exps" / inner)
        (workspace / "pipeline").mkdir()
        assert tracking.workspace_root(workspace / "pipeline") == workspace
        assert tracking.project_root(workspace / "pipeline") == root
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store comes from the project, not the env
    monkeypatch.chdir(root / ".dvc" / "tmp" / "exps" / "tmp4k2x")
    params = parse_params({"seed": 1})
    assert tracking.tracking_uri(params) == f"sqlite:///{root / 'mlflow.db'}"
    assert tracking.artifact_location(params) == str(root / "mlruns")
    monkeypatch.chdir(root / "pipeline")
    assert tracking.tracking_uri(params) == f"sqlite:///{root / 'mlflow.db'}"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert tracking.project_root(outside) == outside  # no repo above: the folder itself


def test_a_copied_store_is_relocated_into_the_copy(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = parse_params({"seed": 1, "tracking": {"experiment": "moves"}})
    original = make_repo(tmp_path / "original")
    client = MlflowClient(tracking.tracking_uri(params, original))
    experiment = tracking.experiment_id(params, original)
    run = client.create_run(experiment)
    (original / "note.txt").write_text("an artifact")
    client.log_artifact(run.info.run_id, str(original / "note.txt"))
    client.set_terminated(run.info.run_id)
    assert tracking.relocate_store(params, original) is None  # at home: nothing to do

    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    assert tracking.relocate_store(params, copy) == str(original)
    moved = MlflowClient(tracking.tracking_uri(params, copy))
    assert moved.get_experiment_by_name("moves").artifact_location.removeprefix("file://") == str(copy / "mlruns")
    old_run = moved.get_run(run.info.run_id)
    assert old_run.info.artifact_uri.removeprefix("file://").startswith(f"{copy}/mlruns/")
    assert [a.path for a in moved.list_artifacts(run.info.run_id)] == ["note.txt"]
    new = moved.create_run(tracking.experiment_id(params, copy))
    assert new.info.artifact_uri.removeprefix("file://").startswith(f"{copy}/mlruns/")
    with sqlite3.connect(copy / "mlflow.db") as con:  # no value anywhere names the original any more
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for row in con.execute(f'SELECT * FROM "{table}"'):
                assert not any(isinstance(v, str) and str(original) + "/" in v for v in row), (table, row)
    assert tracking.relocate_store(params, copy) is None  # once


def test_a_foreign_artifact_location_is_refused(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = parse_params({"seed": 1, "tracking": {"experiment": "foreign"}})
    root = make_repo(tmp_path / "repo")
    MlflowClient(tracking.tracking_uri(params, root)).create_experiment("foreign", str(tmp_path / "shared-artifacts"))
    with pytest.raises(PipelineError, match="outside this project"):
        tracking.experiment_id(params, root)
