"""1 process vs N processes under torchrun, for every task of a params file: the Done-when check of
"same numbers on 1 or N devices".

    OMP_NUM_THREADS=1 python benchmarks/one_vs_n.py --work /tmp/one_vs_n [--nproc 2] [--epochs 1]
        [--limit-train-batches 30] [--tasks digits sentiment ...] [--params params.yaml] [--accelerator gpu]

For each task: `python -m pipeline prepare` once (with the params file's data section), then in two
folders that share the prepared data, `python -m pipeline train` (1 process, trainer.devices=1) and
`torchrun --standalone --nproc-per-node N -m pipeline train` (trainer.devices=N, strategy=ddp), each
followed by `python -m pipeline evaluate` on one process. Prints a Markdown table: the steps, the
largest relative difference of the per-step train_loss (read back from each folder's MLflow store),
best val_loss of each, the key held-out metric of each, whether every held-out metric (and the
baseline's) is equal, and evaluation's gate-trace reconstruction error (a float diagnostic, not a
held-out metric). Only epochs and train batches are cut
(--epochs, --limit-train-batches); everything else is the params file's. Runs one launch at a time.
Every folder, model, checkpoint and MLflow store lives under --work, never in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    drop = ("MLFLOW_TRACKING_URI", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT")
    out = {k: v for k, v in os.environ.items() if k not in drop}
    out.update(PATH=f"{BIN}{os.pathsep}{out.get('PATH', '')}", PYTHONPATH=str(REPO),
               OMP_NUM_THREADS=out.get("OMP_NUM_THREADS", "1"))
    return out


def sh(args: list[str], cwd: Path, timeout: float) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} in {cwd} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc.stdout


def train_losses(work: Path, experiment: str) -> np.ndarray:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss"))
    steps = [s for s, _ in history]
    if steps != list(range(len(steps))):
        raise SystemExit(f"{work}: train_loss steps are not 0..n-1 once each")
    return np.array([v for _, v in history])


# not a held-out quality metric: the float error of evaluation's gate recompute (~1e-6), which moves
# with the weights' last bits; reported in its own column
DIAGNOSTIC = "trace_reconstruction_error"


def compare(task: str, root: Path, nproc: int) -> str:
    """One table row from the folders <task>-1 and <task>-<nproc> under root."""
    result = {}
    for n in (1, nproc):
        work = root / f"{task}-{n}"
        config = json.loads((work / "models" / task / "config.json").read_text())
        metrics = json.loads((work / "metrics" / f"{task}.json").read_text())
        timed = work / "train_seconds"
        result[n] = (train_losses(work, "one-vs-n"), config, metrics,
                     f"{float(timed.read_text()):.0f}" if timed.exists() else "n/a")
    (l1, c1, m1, s1), (ln, cn, mn, sn) = result[1], result[nproc]
    worst = float(np.max(np.abs(ln - l1) / np.abs(l1))) if len(l1) == len(ln) else float("inf")
    key = m1["key_metric"]
    held = {k: v for k, v in m1.items() if isinstance(v, float) and k != DIAGNOSTIC}
    same = all(mn.get(k) == v for k, v in held.items()) and mn.get("baseline") == m1.get("baseline")
    trace = f"{m1.get(DIAGNOSTIC, float('nan')):.1e} / {mn.get(DIAGNOSTIC, float('nan')):.1e}"
    return (f"| {task} | {len(l1)} | {worst:.1e} | {c1['best_val_loss']:.6f} | {cn['best_val_loss']:.6f} | "
            f"{key} {m1[key]:.4f} | {key} {mn[key]:.4f} | {'yes' if same else 'NO'} ({len(held)}) | {trace} | "
            f"{s1} / {sn} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1, help="max_epochs of every task; 0: the params file's")
    ap.add_argument("--limit-train-batches", type=int, default=30, help="per epoch; 0: the params file's")
    ap.add_argument("--tasks", nargs="*")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--accelerator", default="cpu", help="trainer.accelerator of both runs (cpu, gpu)")
    ap.add_argument("--no-run", action="store_true", help="only compare the folders an earlier run left in --work")
    args = ap.parse_args()
    base = yaml.safe_load(args.params.read_text())
    base["tracking"] = {"uri": "sqlite:///mlflow.db", "artifact_location": "mlruns", "experiment": "one-vs-n"}
    tasks = args.tasks or base["tasks"]
    args.work.mkdir(parents=True, exist_ok=True)
    prep = args.work / "prep"
    prep.mkdir(exist_ok=True)
    (prep / "params.yaml").write_text(yaml.safe_dump(base))
    rows = []
    for task in tasks:
        cut = {"max_epochs": args.epochs, "limit_train_batches": args.limit_train_batches}
        base[task].setdefault("train", {}).update({k: v for k, v in cut.items() if v})  # 0: the params file's
        if not args.no_run and not (prep / "data" / "prepared" / task / "manifest.json").exists():
            sh([sys.executable, "-m", "pipeline", "prepare", task], prep, args.timeout)
        for n in (1, args.nproc):
            work = args.work / f"{task}-{n}"
            if args.no_run:
                continue
            shutil.rmtree(work, ignore_errors=True)
            (work / "data").mkdir(parents=True)
            (work / "data" / "prepared").symlink_to(prep / "data" / "prepared")
            raw = json.loads(json.dumps(base))
            raw["trainer"].update(devices=n, strategy="ddp" if n > 1 else "auto", accelerator=args.accelerator)
            (work / "params.yaml").write_text(yaml.safe_dump(raw))
            launch = ([sys.executable, "-m", "pipeline"] if n == 1 else
                      [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(n), "-m", "pipeline"])
            started = time.perf_counter()
            sh([*launch, "train", task], work, args.timeout)
            (work / "train_seconds").write_text(f"{time.perf_counter() - started:.1f}")
            sh([sys.executable, "-m", "pipeline", "evaluate", task], work, args.timeout)
        rows.append(compare(task, args.work, args.nproc))
        print(rows[-1], flush=True)
    print(f"\n| task | steps | max rel. train_loss diff | best val_loss 1 | best val_loss {args.nproc} | "
          f"held-out 1 | held-out {args.nproc} | all held-out metrics equal (how many) | "
          f"gate-trace float error 1 / {args.nproc} | train s (1 / {args.nproc}) |")
    print("|---|---:|---:|---:|---:|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
