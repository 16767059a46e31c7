"""A failed `dvc repro` of a train stage and how to get the model back, with the real dvc CLI.

DVC deletes a stage's cached outputs (models/<task>) before running its command, so a training that
fails leaves no models/<task>. The outputs of the last successful run are in DVC's cache and dvc.lock
still names them: `dvc checkout models/<task>` restores them. checkpoints/<task> (persist) is left
as it was, because the launch checks refuse a bad trainer section before touching anything.
About a minute on 2 cores (three stage processes importing torch, Lightning and MLflow).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

PARAMS = {
    "seed": 1337,
    "tasks": ["digits"],
    "trainer": {"accelerator": "cpu", "devices": 1, "strategy": "auto", "num_nodes": 1, "precision": "32-true"},
    "tracking": {"uri": "sqlite:///mlflow.db", "artifact_location": "mlruns", "experiment": "restore"},
    "digits": {"data": {"max_samples": 300, "val_fraction": 0.1, "test_fraction": 0.2},
               "model": {"hidden_size": 16}, "train": {"batch_size": 32, "max_epochs": 1}},
}


def sh(args: list[str], cwd: Path, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600, start_new_session=True)
    if ok:
        assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}"
    return proc


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_dvc_checkout_restores_the_model_a_failed_repro_deleted(tmp_path):
    repo = tmp_path / "repo"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file() and not (REPO / name).is_symlink():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    (repo / "dvc.lock").unlink(missing_ok=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "restore"], cwd=repo, check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1", PYTHONPATH=str(repo),
               OMP_NUM_THREADS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "site-cache"))
    dvc = str(BIN / "dvc")

    sh([dvc, "repro", "train@digits"], repo, env)
    model, ckpt = repo / "models" / "digits", repo / "checkpoints" / "digits"
    before, ckpt_before = digest(model), digest(ckpt)
    assert {"weights.safetensors", "config.json", "last.ckpt", "best.ckpt"} <= before.keys()

    broken = {**PARAMS, "trainer": {**PARAMS["trainer"], "num_nodes": 2}}  # no launcher: refused in one line
    (repo / "params.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
    failed = sh([dvc, "repro", "train@digits"], repo, env, ok=False)
    assert failed.returncode != 0
    assert "error: trainer.num_nodes=2 needs a launcher" in failed.stdout, failed.stdout[-3000:]
    assert not model.exists()  # DVC removed it before the stage ran
    assert digest(ckpt) == ckpt_before  # the refusal touched nothing

    sh([dvc, "checkout", "models/digits"], repo, env)
    assert digest(model) == before  # the last successful run's model, byte for byte
    (repo / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    status = sh([dvc, "status", "train@digits"], repo, env).stdout
    assert "up to date" in status, status
