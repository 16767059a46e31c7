"""DVC experiments as a user drives them, with the real `dvc` and MLflow, in a committed copy of this repo.

Two tasks (digits, gesture) at a size that trains in seconds, and the long-range experiment: a `dvc repro`
committed as `main`, then
- `dvc exp show --json` has numeric key metrics for the workspace and `main`;
- two experiments queued on one task and run by `dvc queue start -j 1` each rerun only that task's stages and
  `register`, and log one MLflow run each, tagged with the experiment's name, into the project's own store;
  the champion alias is on the best version;
- a workspace `dvc exp run -S gesture.train.max_epochs=5`: `dvc exp show` and `dvc metrics diff`;
- `dvc exp apply` leaves `dvc status` clean; `dvc exp branch` makes a branch whose checkout is clean too;
- a copy of the repository in another folder runs an experiment and writes nothing under the original;
- editing any module a stage imports makes `dvc status` list exactly the stages that run it.

Measured on 2 busy cores: about 4-5 minutes in all (each stage process imports torch, Lightning, MLflow).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_dvc_deps import PACKAGE, closure, entry_files, hashed_by_sources, runs_nothing, stages

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TASKS = ["digits", "gesture"]
STAGE_LINE = "Running stage '"

pytestmark = pytest.mark.slow

TINY = {
    "seed": 1337,
    "tasks": TASKS,
    "trainer": {"accelerator": "cpu", "devices": 1},
    "tracking": {"uri": "sqlite:///mlflow.db", "artifact_location": "mlruns", "experiment": "rnn-pipeline"},
    "longrange": {"gaps": [3, 6], "vocab_size": 4, "train_samples": 64, "test_samples": 32, "hidden_size": 8,
                  "batch_size": 32, "max_epochs": 1, "lr": 0.01},
    "digits": {"data": {"max_samples": 200, "val_fraction": 0.1, "test_fraction": 0.2},
               "model": {"hidden_size": 8}, "train": {"batch_size": 32, "max_epochs": 1, "lr": 0.003}},
    "gesture": {"data": {"val_fraction": 0.2}, "model": {"hidden_size": 8, "frame_stride": 8},
                "train": {"batch_size": 16, "max_epochs": 1, "lr": 0.01}},
}
GIT = ["git", "-c", "user.name=exp", "-c", "user.email=exp@example.invalid", "-c", "commit.gpgsign=false"]


def env_for(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH") and not k.startswith("DVC_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1", DVC_SITE_CACHE_DIR=str(root.parent / f"{root.name}-dvc-site"))
    return env


def sh(args: list[str], cwd: Path, timeout: float = 900, ok: bool = True) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env_for(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


def dvc(repo: Path, *args: str, **kw) -> str:
    return sh([str(BIN / "dvc"), *args], repo, **kw)


def dvc_json(repo: Path, *args: str):
    out = dvc(repo, *args, "--json")
    return json.loads(out[min(i for i in (out.find("{"), out.find("[")) if i >= 0):])


def stages_run(output: str) -> list[str]:
    return [line.split(STAGE_LINE, 1)[1].split("'")[0] for line in output.splitlines() if STAGE_LINE in line]


def commit(repo: Path, message: str) -> None:
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", message], cwd=repo, check=True)


def files_of(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root: (size, mtime in ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def processes_under(root: Path) -> list[int]:
    """Processes (e.g. DVC's celery queue workers) working in or started on `root`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd == str(root) or cwd.startswith(f"{root}/") or str(root) in cmd:
            found.append(int(proc.name))
    return found


def store(repo: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def runs(repo: Path) -> list:
    client = store(repo)
    return client.search_runs([client.get_experiment_by_name("rnn-pipeline").experiment_id])


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A committed copy of this repository after one `dvc repro`: `main` with dvc.lock and the metrics."""
    assert (BIN / "dvc").is_file(), f"no dvc next to {sys.executable}: run the tests with the venv's python"
    root = tmp_path_factory.mktemp("experiments") / "repo"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file() and not src.is_symlink() and not name.startswith(("metrics/", "plots/", "longrange/",
                                                                                        "data/sources/", "probes/")):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    (root / "dvc.lock").unlink(missing_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    commit(root, "tiny params")
    ran = stages_run(dvc(root, "repro"))
    assert set(ran) == {f"{s}@{t}" for s in ("sources", "prepare", "train", "evaluate") for t in TASKS} | {
        "register", "longrange"}
    commit(root, "dvc repro: dvc.lock, metrics and plot data")
    assert subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout == ""
    yield root
    for pid in processes_under(root):  # nothing DVC started may outlive the test
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def key_metrics(exp_show: list, name_or_rev: str) -> dict:
    """{file: {metric: value}} for one row of `dvc exp show --json` (the workspace, a branch or an experiment)."""
    for row in exp_show:
        candidates = [row] + [e for group in (row.get("experiments") or []) for e in group.get("revs", [])]
        for entry in candidates:
            if name_or_rev in (entry.get("name"), entry.get("rev")):
                return {f: d["data"] for f, d in entry["data"]["metrics"].items()}
    raise AssertionError(f"{name_or_rev} not in dvc exp show: {[r.get('name') for r in exp_show]}")


def test_metrics_are_committed_numbers(repo):
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True).stdout.split()
    for task in TASKS:
        assert f"metrics/{task}.json" in tracked and f"plots/saturation/{task}.json" in tracked
        assert f"data/sources/{task}.json" in tracked
    assert {"longrange/metrics.json", "longrange/accuracy.json", "plots/confusion/digits.json"} <= set(tracked)
    assert not any(p.startswith(("models/", "figures/", "samples/", "registry/", "checkpoints/")) for p in tracked)
    shown = dvc_json(repo, "exp", "show")
    for rev in ("workspace", "main"):
        metrics = key_metrics(shown, rev)
        assert isinstance(metrics["metrics/gesture.json"]["accuracy"], float), metrics
        assert isinstance(metrics["longrange/metrics.json"]["lstm"]["gap_6"], float), metrics


def test_queued_experiments_run_one_task_into_the_project_store(repo):
    before = {r.info.run_id for r in runs(repo)}
    for name, lr in (("lr-high", 0.03), ("lr-low", 0.002)):
        dvc(repo, "exp", "run", "--queue", "-n", name, "-S", f"gesture.train.lr={lr}")
    dvc(repo, "queue", "start", "-j", "1")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = dvc(repo, "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    else:
        dvc(repo, "queue", "kill", "lr-high", "lr-low", ok=False)
        pytest.fail(f"the queue did not finish: {status}")
    assert status.count("Success") == 2, status
    for name in ("lr-high", "lr-low"):
        assert sorted(stages_run(dvc(repo, "queue", "logs", name))) == ["evaluate@gesture", "register",
                                                                        "train@gesture"], name

    new = [r for r in runs(repo) if r.info.run_id not in before]
    assert sorted(r.data.tags.get("dvc_experiment") for r in new) == ["lr-high", "lr-low"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    for run in new:
        assert run.data.tags["task"] == "gesture" and run.data.tags["dvc_baseline_rev"] == head
        assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(repo / "mlruns")
        assert any(k.startswith("test_") for k in run.data.metrics)  # evaluation logged into it
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))  # no throw-away store anywhere

    client = store(repo)
    assert len(client.search_model_versions("name='digits'")) == 1  # digits untouched by both
    versions = client.search_model_versions("name='gesture'")
    assert len(versions) == 3 and {v.run_id for v in versions} >= {r.info.run_id for r in new}
    champion = client.get_model_version_by_alias("gesture", "champion")
    best = max(float(v.tags["metric.accuracy"]) for v in versions)
    assert float(champion.tags["metric.accuracy"]) == best  # every move needed at least the champion's accuracy

    shown = dvc_json(repo, "exp", "show")
    for name in ("lr-high", "lr-low"):
        assert isinstance(key_metrics(shown, name)["metrics/gesture.json"]["accuracy"], float), name

    # `dvc plots diff` draws both experiments in each plot: the series by core or gate, the revisions by shape/dash
    plots = dvc_json(repo, "plots", "diff", "lr-high", "lr-low")["data"]
    for title, field in (("Long-range memory, test accuracy per gap (LSTM vs vanilla RNN)", "core"),
                         ("plots/saturation/gesture.json", "gate"), ("plots/confusion/gesture.json", None)):
        (plot,) = plots[title]
        assert plot["type"] == "vega" and plot["revisions"] == ["lr-high", "lr-low"], title
        if field is not None:
            spec = json.dumps(plot["content"])
            assert f'"color": {{"field": "{field}"' in spec and '{"field": "rev"' in spec, title


def test_workspace_experiment_shows_and_diffs(repo):
    out = dvc(repo, "exp", "run", "-n", "five-epochs", "-S", "gesture.train.max_epochs=5")
    assert sorted(stages_run(out)) == ["evaluate@gesture", "register", "train@gesture"], \
        out[-3000:]
    shown = dvc_json(repo, "exp", "show")
    for rev in ("workspace", "main", "five-epochs"):
        assert isinstance(key_metrics(shown, rev)["metrics/gesture.json"]["accuracy"], float), rev
    now = json.loads((repo / "metrics" / "gesture.json").read_text())["accuracy"]
    old = json.loads(subprocess.run(["git", "show", "HEAD:metrics/gesture.json"], cwd=repo, capture_output=True,
                                    text=True, check=True).stdout)["accuracy"]
    diff = dvc_json(repo, "metrics", "diff", "--all")
    assert diff["metrics/gesture.json"]["accuracy"] == {"old": old, "new": now, "diff": pytest.approx(now - old)}
    text = dvc(repo, "metrics", "diff", "--all")
    assert any("metrics/gesture.json" in line and "accuracy" in line for line in text.splitlines()), text
    changed = dvc_json(repo, "params", "diff")["params.yaml"]
    assert changed["gesture.train.max_epochs"] == {"old": 1, "new": 5, "diff": 4}
    run = [r for r in runs(repo) if r.data.tags.get("dvc_experiment") == "five-epochs"]
    assert len(run) == 1 and run[0].data.tags["task"] == "gesture"


def test_apply_and_branch_leave_outputs_matching_dvc_lock(repo):
    dvc(repo, "exp", "apply", "lr-high")
    assert dvc_json(repo, "status") == {}
    assert yaml.safe_load((repo / "params.yaml").read_text())["gesture"]["train"]["lr"] == 0.03
    receipt = json.loads((repo / "registry" / "gesture.json").read_text())
    assert receipt["run_id"] == json.loads((repo / "models" / "gesture" / "config.json").read_text())["mlflow_run_id"]
    assert stages_run(dvc(repo, "repro", "--dry")) == []
    dvc(repo, "exp", "branch", "lr-low", "lr-low-branch")
    subprocess.run([*GIT, "checkout", "-q", "-f", "lr-low-branch"], cwd=repo, check=True)
    dvc(repo, "checkout", "--force")
    assert dvc_json(repo, "status") == {}
    subprocess.run([*GIT, "checkout", "-q", "-f", "main"], cwd=repo, check=True)
    dvc(repo, "checkout", "--force")
    assert dvc_json(repo, "status") == {}


def test_a_copy_writes_only_into_itself(repo, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(repo, copy, symlinks=True)
    before = files_of(repo)
    out = dvc(copy, "exp", "run", "-n", "in-the-copy", "-S", "gesture.train.lr=0.02")
    assert sorted(stages_run(out)) == ["evaluate@gesture", "register", "train@gesture"], \
        out[-3000:]
    assert files_of(repo) == before  # not one file added or touched under the original
    run = [r for r in runs(copy) if r.data.tags.get("dvc_experiment") == "in-the-copy"]
    assert len(run) == 1 and Path(run[0].info.artifact_uri.removeprefix("file://")).is_relative_to(copy)
    assert not [r for r in runs(repo) if r.data.tags.get("dvc_experiment") == "in-the-copy"]
    client = store(copy)  # the copy's store now names the copy everywhere, older runs included
    experiment = client.get_experiment_by_name("rnn-pipeline")
    assert experiment.artifact_location.removeprefix("file://") == str(copy / "mlruns")
    assert all(str(repo) + "/" not in r.info.artifact_uri for r in runs(copy))
    # the CLI finds the copy's params and store from a subfolder: the champion digits model predicts
    import numpy as np

    x = np.load(copy / "data" / "prepared" / "digits" / "test.npz")["x"][0]
    np.save(tmp_path / "digit.npy", x)
    shown = sh([str(BIN / "python"), "-m", "pipeline", "predict", "digits", str(tmp_path / "digit.npy")],
               copy / "pipeline" / "models")
    assert shown.strip() and "error" not in shown
    assert files_of(repo) == before
    for pid in processes_under(copy):
        os.kill(pid, signal.SIGKILL)


def test_editing_a_module_marks_exactly_the_stages_that_run_it(repo):
    address = {a: (cmd, deps) for a, cmd, deps in stages(repo)}  # the copy's stages (its two tasks)
    modules = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"
                     and not (p.name == "__init__.py" and runs_nothing(p)))
    assert dvc_json(repo, "status") == {}
    for module in modules:
        rel = module.relative_to(REPO)
        # a data module is prepare's through data/sources/<task>.json (the sources@ stages hash it)
        users = {a for a, (cmd, _) in address.items() if module in closure(entry_files(cmd)) - hashed_by_sources(cmd)}
        listed = {a for a, (_, deps) in address.items() if rel in deps or any(d in rel.parents for d in deps)}
        assert users <= listed, (rel, users - listed)  # what the test of dvc.yaml checks, in this copy
        target = repo / rel
        original = target.read_bytes()
        target.write_bytes(original + b"\n# edited\n")
        try:
            changed = set(dvc_json(repo, "status"))
        finally:
            target.write_bytes(original)
        assert users <= changed == listed, rel
