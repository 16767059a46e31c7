"""Real launchers, as a user drives them: `torchrun` with 2 processes, two simulated nodes (two
`torchrun --nnodes 2` side by side on 127.0.0.1), Lightning's own launcher (`python -m pipeline train`
with trainer.devices=2, strategy=ddp), and plain `python -m pipeline train` killed by SIGTERM.

Default tasks with their randomness on (sentiment: dropout, here between two layers too; digits: dropout
and shift augmentation), at a size that trains in seconds. One process, 2 processes and 2 nodes must log
the same train_loss at every step (relative difference <= 1e-4) and reach the same val_loss. Launch
mistakes must end within seconds in one `error:` line, before any checkpoint, model or MLflow run.

Every process runs in its own session (process group) with a timeout and OMP_NUM_THREADS=1; only those
groups are killed. About 3 minutes on 2 cores (mostly each process importing torch, Lightning and MLflow).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN_TIMEOUT = 420

pytestmark = pytest.mark.slow

PARAMS = {
    "seed": 1337,
    "tasks": ["digits", "sentiment"],
    "trainer": {"accelerator": "cpu", "devices": 1, "strategy": "auto", "num_nodes": 1, "precision": "32-true"},
    "tracking": {"uri": "sqlite:///mlflow.db", "artifact_location": "mlruns", "experiment": "launch"},
    "digits": {"data": {"max_samples": 300, "val_fraction": 0.1, "test_fraction": 0.2},
               "model": {"hidden_size": 16, "dropout": 0.3},
               "train": {"batch_size": 32, "max_epochs": 2, "lr": 0.003, "augment_shift": 2}},
    "sentiment": {"data": {"max_samples": 400, "max_tokens": 16, "min_count": 1, "max_vocab": 500,
                           "val_fraction": 0.1, "test_fraction": 0.1},
                  "model": {"hidden_size": 16, "embedding_dim": 8, "num_layers": 2, "dropout": 0.5},
                  "train": {"batch_size": 32, "max_epochs": 2, "lr": 0.003}},
}


def env_for(**extra: str) -> dict[str, str]:
    drop = ("MLFLOW_TRACKING_URI", "PYTHONPATH", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_NTASKS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=env_for(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """Wait for every process; on timeout kill the process groups we started, and fail."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a launch ran past {timeout} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder(root: Path, name: str, data: Path, **trainer) -> Path:
    """A working folder: its own params.yaml (trainer overrides), MLflow store, models and checkpoints."""
    work = root / name
    (work / "data").mkdir(parents=True)
    (work / "data" / "prepared").symlink_to(data)
    raw = json.loads(json.dumps(PARAMS))
    raw["trainer"].update(trainer)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    return work


PY = [sys.executable, "-m", "pipeline"]
TORCHRUN = [str(BIN / "torchrun")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("launch")
    work = root / "prep"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    for (code, _out, err) in finish([start([*PY, "prepare", task], work) for task in PARAMS["tasks"]], 300):
        assert code == 0, err[-3000:]
    return work / "data" / "prepared"


def train_losses(work: Path) -> np.ndarray:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("launch").experiment_id])
    assert run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss"))
    steps = [s for s, _ in history]
    assert steps == list(range(len(steps))), "every step logged once"
    return np.array([v for _, v in history])


@pytest.mark.parametrize("task", ["digits", "sentiment"])
def test_one_process_two_processes_and_two_nodes_agree(data, tmp_path, task):
    one = folder(tmp_path, "one", data)
    two = folder(tmp_path, "two", data, devices=2, strategy="ddp")
    nodes = folder(tmp_path, "nodes", data, devices=1, num_nodes=2, strategy="ddp")
    own = folder(tmp_path, "lightning", data, devices=2, strategy="ddp")  # Lightning's own launcher
    port = free_port()
    node = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
            "--master-port", str(port)]
    runs = {"one": [start([*PY, "train", task], one)]}
    runs["two"] = [start([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "pipeline", "train", task], two)]
    runs["nodes"] = [start([*node, "--node-rank", str(rank), "-m", "pipeline", "train", task], nodes)
                     for rank in (0, 1)]
    runs["lightning"] = [start([*PY, "train", task], own)]
    for name, procs in runs.items():  # all seven processes started side by side: one gloo group per launch
        for code, _out, err in finish(procs, TRAIN_TIMEOUT):
            assert code == 0, f"{name}: {err[-4000:]}"
    folders = {"one": one, "two": two, "nodes": nodes, "lightning": own}
    configs = {name: json.loads((w / "models" / task / "config.json").read_text()) for name, w in folders.items()}
    losses = {name: train_losses(w) for name, w in folders.items()}
    reference = losses["one"]
    assert len(reference) == configs["one"]["global_step"] >= 10
    for name in ("two", "nodes", "lightning"):
        assert configs[name]["world_size"] == 2
        assert (configs[name]["epochs"], configs[name]["global_step"]) == (configs["one"]["epochs"], len(reference))
        worst = float(np.max(np.abs(losses[name] - reference) / np.abs(reference)))
        print(f"{task} 1 vs {name}: max relative train_loss difference {worst:.2e} over {len(reference)} steps")
        assert worst <= 1e-4
        assert configs[name]["best_val_loss"] == pytest.approx(configs["one"]["best_val_loss"], rel=1e-4)
        assert configs[name]["best_epoch"] == configs["one"]["best_epoch"]


def one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-4000:]
    assert "Traceback" not in err.split(errors[0])[0], err[-4000:]  # no traceback of ours before it
    return errors[0]


def assert_untouched(work: Path) -> None:
    assert not (work / "checkpoints").exists() and not (work / "models").exists()
    assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()


def test_nodes_without_a_launcher_fail_in_seconds(data, tmp_path):
    work = folder(tmp_path, "nodes", data, devices=1, num_nodes=2, strategy="ddp")
    started = time.monotonic()
    ((code, out, err),) = finish([start([*PY, "train", "digits"], work)], 60)
    elapsed = time.monotonic() - started
    assert code == 2 and elapsed < 30, (elapsed, err[-3000:])
    line = one_error_line(err)
    assert "num_nodes=2" in line and "launcher" in line
    assert err.strip() == line  # the whole of stderr
    assert_untouched(work)


@pytest.mark.parametrize(("nproc", "devices", "says"), [(2, 1, "1 x 1 = 1, but the launcher started 2"),
                                                         (3, 2, "2 x 1 = 2, but the launcher started 3")])
def test_devices_that_disagree_with_torchrun_fail_in_seconds(data, tmp_path, nproc, devices, says):
    work = folder(tmp_path, "mismatch", data, devices=devices, strategy="ddp")
    started = time.monotonic()
    ((code, out, err),) = finish([start([*TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "-m",
                                         "pipeline", "train", "digits"], work)], 90)
    elapsed = time.monotonic() - started
    assert code != 0 and elapsed < 30, (elapsed, err[-3000:])
    assert says in one_error_line(err)
    assert_untouched(work)


def test_a_split_too_small_for_every_rank_fails_in_one_line(tmp_path):
    from pipeline.datasets.prepared import Prepared, save_prepared

    rng = np.random.default_rng(0)
    split = lambda n: {"x": rng.random((n, 28, 28), dtype=np.float32), "y": rng.integers(0, 10, n)}  # noqa: E731
    save_prepared(Prepared({"train": split(64), "val": split(1), "test": split(4)},
                           {"labels": [str(d) for d in range(10)]}, {"package": "tests"}), tmp_path / "data" / "digits")
    work = folder(tmp_path, "small", tmp_path / "data", devices=2, strategy="ddp")
    started = time.monotonic()
    ((code, out, err),) = finish([start([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m",
                                         "pipeline", "train", "digits"], work)], 90)
    assert code != 0 and time.monotonic() - started < 30, err[-3000:]
    line = one_error_line(err)
    assert "val split (1 samples) gives 1 of 2" in line and "no batch" in line, line
    assert_untouched(work)


def test_sigterm_marks_the_run_killed_and_the_resume_finishes_it(data, tmp_path):
    from mlflow.tracking import MlflowClient

    work = folder(tmp_path, "killed", data)
    raw = yaml.safe_load((work / "params.yaml").read_text())
    raw["digits"]["train"]["max_epochs"] = 6
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    last = work / "checkpoints" / "digits" / "last.ckpt"
    proc = start([*PY, "train", "digits"], work)
    try:
        deadline = time.monotonic() + TRAIN_TIMEOUT
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last.exists() and proc.poll() is None, "training ended or stalled before its first checkpoint"
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not (work / "models" / "digits").exists()
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("launch").experiment_id])
    assert run.info.status == "KILLED"

    ((code, out, err),) = finish([start([*PY, "train", "digits"], work)], TRAIN_TIMEOUT)
    assert code == 0 and "resuming from" in out, err[-3000:]
    losses = train_losses(work)  # FINISHED, every step once
    config = json.loads((work / "models" / "digits" / "config.json").read_text())
    assert config["epochs"] == 6 and len(losses) == config["global_step"]
    ((code, out, err),) = finish([start([*PY, "train", "digits"], work)], TRAIN_TIMEOUT)
    assert code == 0 and "already trained" in out, err[-3000:]
