"""Wall time of the default pipeline, stage by stage, in a fresh clone; then of a no-op `dvc repro`.

    python benchmarks/repro_time.py [--keep DIR]

(Not benchmarks/pipeline.py: a script of that name would shadow the `pipeline` package for its neighbours.)

Clones the committed HEAD into a temporary folder (its own data, models and MLflow store), runs
every stage with `dvc repro --single-item` in the order of the DAG, then `dvc repro` twice more:
the first must find nothing to do. Prints a markdown table. Targets on a 2-core CPU: whole
pipeline <= 10 minutes, no-op <= 3 s.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CPU = [0.0]  # user + system seconds of every stage's processes
GROUPS = ("sources", "prepare", "train", "evaluate", "explore")  # the per-task stages, in the DAG's order


def stage_order(repo: Path) -> list[str]:
    tasks = yaml.safe_load((repo / "params.yaml").read_text())["tasks"]
    order = [f"{stage}@{t}" for stage in GROUPS for t in tasks]
    return order + ["register", "longrange"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    """(wall seconds, stdout); the CPU seconds of the command and its children add to CPU[0]."""
    start, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    CPU[0] += children_cpu() - cpu
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed, done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, default=None, help="clone here and keep it (default: a temp folder)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    if work.exists() and any(work.iterdir()):
        sys.exit(f"{work} is not empty")
    subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    rows = []
    try:
        for stage in stage_order(work):
            seconds, _ = run(["dvc", "repro", "--single-item", stage], work, env)
            rows.append((stage, seconds))
            print(f"{stage}: {seconds:.1f} s", file=sys.stderr)
        noop, out = run(["dvc", "repro"], work, env)
        if "didn't change" not in out and "up to date" not in out.lower():
            print(f"warning: the second `dvc repro` may have run something:\n{out[-1000:]}", file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    total = sum(s for _, s in rows)
    print("| stage | wall s |\n|---|---:|")
    for group in GROUPS:
        part = [(n, s) for n, s in rows if n.startswith(group + "@")]
        for name, seconds in part:
            print(f"| {name} | {seconds:.1f} |")
        print(f"| **{group}, all tasks** | **{sum(s for _, s in part):.1f}** |")
    for name, seconds in rows:
        if "@" not in name:
            print(f"| {name} | {seconds:.1f} |")
    print(f"| **whole pipeline** | **{total:.1f}** ({total / 60:.1f} min; target <= 10 min) |")
    print(f"| no-op `dvc repro` | {noop:.2f} (target <= 3 s) |")
    print(f"\nCPU time of all stages (user + system): {CPU[0]:.1f} s on {os.cpu_count()} cores; "
          f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
