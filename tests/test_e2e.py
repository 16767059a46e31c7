"""The whole pipeline through DVC, in a copy of this repository with a shrunken params.yaml, and a real
SIGKILL in the middle of `python -m pipeline train`.

The copy is a fresh git repository in a temporary folder (tracked and untracked-but-not-ignored files of
this checkout, `.dvc/` included). Every stage runs as DVC runs it: `python -m pipeline <stage> [task]`
from the copy's root, so the copied package is imported (the current directory comes first on sys.path,
ahead of the editable install), and the MLflow store is the copy's own sqlite:///mlflow.db.

Measured on 2 cores: the first `dvc repro` of all 30 stages takes about 2.5 min (most of it is each
process importing torch, Lightning and MLflow), the rest of this module about 1.5 min.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: python, dvc (not resolved: a venv's python is a link)
TASKS = ["digits", "melody", "sentiment", "gesture", "translation", "activity", "charlm"]
STAGE_LINE = re.compile(r"Running stage '([^']+)'")

pytestmark = pytest.mark.slow

# Every task, every stage, at a size that trains in seconds: the point is that each stage succeeds.
TINY = {
    "seed": 1337,
    "tasks": TASKS,
    "trainer": {"accelerator": "cpu", "devices": 1, "strategy": "auto", "num_nodes": 1, "precision": "32-true"},
    "tracking": {"uri": "sqlite:///mlflow.db", "artifact_location": "mlruns", "experiment": "rnn-pipeline"},
    "longrange": {"gaps": [5, 10], "vocab_size": 4, "train_samples": 128, "test_samples": 64, "hidden_size": 16,
                  "batch_size": 32, "max_epochs": 1, "lr": 0.01},
    "digits": {"data": {"max_samples": 300, "val_fraction": 0.1, "test_fraction": 0.2},
               "model": {"hidden_size": 16},
               "train": {"batch_size": 32, "max_epochs": 1, "lr": 0.003}},
    "melody": {"data": {"max_pieces": 6, "max_notes": 16, "val_fraction": 0.2, "test_fraction": 0.2},
               "model": {"hidden_size": 16, "embedding_dim": 8},
               "train": {"batch_size": 4, "max_epochs": 1, "lr": 0.005}},
    "sentiment": {"data": {"max_samples": 400, "max_tokens": 16, "min_count": 1, "max_vocab": 500,
                           "val_fraction": 0.1, "test_fraction": 0.1},
                  "model": {"hidden_size": 16, "embedding_dim": 8},
                  "train": {"batch_size": 32, "max_epochs": 1, "lr": 0.003}},
    "gesture": {"data": {"val_fraction": 0.2},
                "model": {"hidden_size": 16, "frame_stride": 4},
                "train": {"batch_size": 16, "max_epochs": 1, "lr": 0.01}},
    "translation": {"data": {"max_number": 300, "val_fraction": 0.1, "test_fraction": 0.1},
                    "model": {"hidden_size": 32, "embedding_dim": 8, "attention": True},
                    "train": {"batch_size": 32, "max_epochs": 1, "lr": 0.005}},
    "activity": {"data": {"clips_per_stream": 2, "train_streams": 20, "val_streams": 6, "test_streams": 6,
                          "val_fraction": 0.25},
                 "model": {"hidden_size": 16},
                 "train": {"batch_size": 4, "max_epochs": 1, "lr": 0.005}},
    "charlm": {"data": {"max_chars": 20000, "val_fraction": 0.1},
               "model": {"hidden_size": 32, "embedding_dim": 8},
               "train": {"batch_size": 32, "max_epochs": 1, "lr": 0.004, "block_size": 32}},
}


def clean_env(root: Path, **extra: str) -> dict[str, str]:
    """The venv first on PATH, no telemetry, the store of params.yaml (not the caller's), `root`'s package."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1", PYTHONPATH=str(root),
               PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def sh(args: list[str], cwd: Path, env: dict, timeout: float = 600, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc


def copy_repo(dest: Path) -> None:
    """This checkout's files (tracked, and untracked ones git does not ignore) into `dest`, committed."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file() and not src.is_symlink():  # deleted in the working tree, or a link: left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    assert (dest / ".dvc" / "config").is_file() and (dest / "dvc.yaml").is_file()
    (dest / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    git = ["git", "-c", "user.name=e2e", "-c", "user.email=e2e@example.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "e2e"], cwd=dest, check=True)


def stages_run(output: str) -> list[str]:
    return STAGE_LINE.findall(output)


def dvc_status(repo: Path, env: dict) -> dict:
    out = sh([str(BIN / "dvc"), "status", "--json"], repo, env).stdout
    return json.loads(out[out.index("{"):])  # anything DVC warns about comes before the JSON


TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A copy of the repository after one full `dvc repro` of the tiny params: (root, env)."""
    assert (BIN / "dvc").is_file(), f"no dvc next to {sys.executable}: run the tests with the venv's python"
    repo = tmp_path_factory.mktemp("e2e") / "repo"
    repo.mkdir()
    copy_repo(repo)
    # one torch thread: the models are tiny, and two threads crawl when anything else holds a core
    env = clean_env(repo, DVC_SITE_CACHE_DIR=str(repo.parent / "dvc-site-cache"), OMP_NUM_THREADS="1")
    started = time.perf_counter()
    proc = sh([str(BIN / "dvc"), "repro"], repo, env, timeout=900)
    TIMES["first dvc repro"] = time.perf_counter() - started
    ran = stages_run(proc.stdout)
    expected = {f"{stage}@{task}" for stage in ("sources", "prepare", "train", "evaluate")
                for task in TASKS}
    assert set(ran) == expected | {"register", "longrange"} and len(ran) == len(set(ran)), ran
    yield repo, env
    print("\ne2e timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMES.items()))


def test_the_copy_is_what_runs(built):
    repo, env = built
    out = sh([str(BIN / "python"), "-c", "import pipeline; print(pipeline.__file__)"], repo, env).stdout
    assert Path(out.strip().splitlines()[-1]).resolve() == (repo / "pipeline" / "__init__.py").resolve()


def test_first_repro_builds_every_output(built):
    from mlflow.tracking import MlflowClient

    repo, _ = built
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    for task in TASKS:
        assert (repo / "data" / "prepared" / task / "manifest.json").is_file()
        assert (repo / "models" / task / "weights.safetensors").is_file()
        metrics = json.loads((repo / "metrics" / f"{task}.json").read_text())
        about = json.loads((repo / "samples" / task / "evaluation.json").read_text())
        assert next(iter(metrics)) == about["key_metric"] == get_task(task).key_metric, task  # the key metric first
        for png in ("gate_saturation.png", "gate_heatmaps.png"):
            assert (repo / "figures" / task / png).stat().st_size > 0, (task, png)
        assert (repo / "plots" / "saturation" / f"{task}.json").is_file()
        assert (repo / "data" / "sources" / f"{task}.json").is_file()
        receipt = json.loads((repo / "registry" / f"{task}.json").read_text())
        assert receipt["name"] == task and receipt["version"] == 1 and receipt["alias"] == "champion"
    results = json.loads((repo / "longrange" / "results.json").read_text())
    assert results
    for png in ("accuracy.png", "forget_gate.png"):
        assert (repo / "longrange" / png).is_file()

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    for task in TASKS:
        champion = client.get_model_version_by_alias(task, "champion")
        assert str(champion.version) == "1", task
        run = client.get_run(champion.run_id)
        assert run.data.tags["task"] == task and run.data.tags["git_commit"] == head  # trained in the copy
        split = "val" if task == "charlm" else "test"  # evaluation's metrics are named after its split
        assert any(k.startswith(f"{split}_") and k != "val_loss" for k in run.data.metrics), task  # evaluation
        assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(repo / "mlruns")


def test_second_repro_runs_nothing(built):
    repo, env = built
    started = time.perf_counter()
    assert dvc_status(repo, env) == {}
    proc = sh([str(BIN / "dvc"), "repro"], repo, env)
    TIMES["status + no-op dvc repro"] = time.perf_counter() - started
    assert stages_run(proc.stdout) == [], proc.stdout[-3000:]


def test_one_changed_param_reruns_that_task_and_register_only(built):
    from mlflow.tracking import MlflowClient

    repo, env = built
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["translation"]["train"]["lr"] *= 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc_status(repo, env)
    assert set(status) == {"train@translation"}, status  # downstream stages change only once it has run
    assert status["train@translation"] == [{"changed deps": {"params.yaml": {"translation.train": "modified"}}}]

    started = time.perf_counter()
    proc = sh([str(BIN / "dvc"), "repro"], repo, env)
    TIMES["repro after one param change"] = time.perf_counter() - started
    assert sorted(stages_run(proc.stdout)) == ["evaluate@translation", "register", "train@translation"], \
        proc.stdout[-3000:]
    assert dvc_status(repo, env) == {}

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    for task in TASKS:
        versions = client.search_model_versions(f"name='{task}'")
        receipt = json.loads((repo / "registry" / f"{task}.json").read_text())
        if task == "translation":  # a new run, a new version; the alias follows the better one
            assert len(versions) == 2 and receipt["version"] == 2 and receipt["new_version"]
        else:  # the same runs: registering again made no version
            assert len(versions) == 1 and receipt["version"] == 1 and not receipt["new_version"], task
        assert str(client.get_model_version_by_alias(task, "champion").version) == str(receipt["champion_version"])


def test_metrics_and_plots_show(built, tmp_path):
    repo, env = built
    started = time.perf_counter()
    shown = sh([str(BIN / "dvc"), "metrics", "show"], repo, env).stdout
    for task in TASKS:
        assert f"metrics/{task}.json" in shown, shown[-3000:]
    assert "longrange/metrics.json" in shown
    sh([str(BIN / "dvc"), "plots", "show", "-o", str(tmp_path / "plots")], repo, env)
    TIMES["metrics show + plots show"] = time.perf_counter() - started
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "gate_heatmaps.png" in page and "accuracy.png" in page


# --- a real SIGKILL in the middle of training --------------------------------------------------

KILL_PARAMS = {
    "seed": 7,
    "tasks": ["digits"],
    "trainer": {"accelerator": "cpu", "devices": 1},
    "digits": {"data": {"max_samples": 600, "val_fraction": 0.1, "test_fraction": 0.1},
               "model": {"hidden_size": 48, "dropout": 0.2},
               "train": {"batch_size": 16, "max_epochs": 8, "lr": 0.003}},
}


def layout(root: Path) -> tuple[Path, dict]:
    """A working folder with params.yaml and data/prepared/digits (a real prepare), its own MLflow store."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(KILL_PARAMS))
    env = clean_env(REPO, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", OMP_NUM_THREADS="1")
    sh([sys.executable, "-m", "pipeline", "prepare", "digits"], root, env)
    return root, env


def test_sigkill_mid_training_resumes_and_ends_like_an_uninterrupted_run(tmp_path):
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    train = [sys.executable, "-m", "pipeline", "train", "digits"]
    killed, env = layout(tmp_path / "killed")
    last = killed / "checkpoints" / "digits" / "last.ckpt"
    proc = subprocess.Popen(train, cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last.exists() and proc.poll() is None, "training ended or stalled before its first checkpoint"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "models" / "digits").exists()  # killed before the end: nothing half-written
    run_id = json.loads((killed / "checkpoints" / "digits" / "resume.json").read_text())["run_id"]
    assert run_id

    resumed = sh(train, killed, env)
    assert "resuming from checkpoints/digits/last.ckpt" in resumed.stdout, resumed.stdout[-3000:]
    reference, ref_env = layout(tmp_path / "reference")
    fresh = sh(train, reference, ref_env)
    assert "resuming" not in fresh.stdout

    a = load_file(killed / "models" / "digits" / "weights.safetensors")
    b = load_file(reference / "models" / "digits" / "weights.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    info = json.loads((killed / "models" / "digits" / "config.json").read_text())
    ref_info = json.loads((reference / "models" / "digits" / "config.json").read_text())
    assert (info["epochs"], info["global_step"]) == (ref_info["epochs"], ref_info["global_step"])
    assert info["best_val_loss"] == pytest.approx(ref_info["best_val_loss"], abs=1e-6)
    assert info["mlflow_run_id"] == run_id  # the resumed run continues the killed one's MLflow run

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("rnn-pipeline").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
