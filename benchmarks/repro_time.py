"""Wall time of the default pipeline, stage by stage, in a fresh clone; then of a no-op `dvc repro`.

    python benchmarks/repro_time.py [--keep DIR]

(Not benchmarks/pipeline.py: a script of that name would shadow the `pipeline` package for its neighbours.)

Clones the committed HEAD into a temporary folder (its own data, models and MLflow store) and runs
one plain `dvc repro`, the command a user types. A stage's time runs from DVC's "Running stage" line
to the next stage's (the last one's to the exit), so it includes DVC's own work for the stage:
hashing its dependencies and outputs, caching, the lock file. Then `dvc repro` once more, which
must find nothing to do. Prints a markdown table and the CPU seconds of everything (user + system
of all processes: the number that load on a shared machine does not change). Targets on a 2-core
CPU: whole pipeline <= 10 minutes, no-op <= 3 s.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("sources", "prepare", "train", "evaluate")  # the per-task stages, in the DAG's order
STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def repro(cwd: Path, env: dict) -> tuple[list[tuple[str, float]], float, float, str]:
    """One `dvc repro`: ([(stage, wall seconds)], total wall seconds, CPU seconds, its output)."""
    start, cpu = time.perf_counter(), children_cpu()
    proc = subprocess.Popen(["dvc", "repro"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    marks, lines = [], []
    for line in proc.stdout:
        lines.append(line)
        found = STAGE_LINE.match(line)
        if found:
            marks.append((found[1], time.perf_counter()))
            print(f"{marks[-1][1] - start:7.1f} s  {found[1]}", file=sys.stderr, flush=True)
    code = proc.wait()
    end = time.perf_counter()
    output = "".join(lines)
    if code:
        sys.exit(f"dvc repro failed ({code}):\n{output[-3000:]}")
    ends = [t for _, t in marks[1:]] + [end] * bool(marks)  # a no-op run has no stage
    rows = [(name, stop - begun) for (name, begun), stop in zip(marks, ends, strict=True)]
    return rows, end - start, children_cpu() - cpu, output


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
    try:
        rows, total, cpu, _ = repro(work, env)
        again, noop, _, out = repro(work, env)
        if again:
            print(f"warning: the second `dvc repro` ran {[n for n, _ in again]}:\n{out[-1000:]}", file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("| stage | wall s |\n|---|---:|")
    for group in GROUPS:
        part = [(n, s) for n, s in rows if n.startswith(group + "@")]
        print(f"| **{group}, all tasks** | **{sum(s for _, s in part):.1f}** |")
        for name, seconds in part:
            print(f"| {name} | {seconds:.1f} |")
    for name, seconds in rows:
        if "@" not in name:
            print(f"| {name} | {seconds:.1f} |")
    print(f"| **whole `dvc repro`** | **{total:.1f}** ({total / 60:.1f} min; target <= 10 min) |")
    print(f"| no-op `dvc repro` | {noop:.2f} (target <= 3 s) |")
    print(f"\nCPU time of the whole `dvc repro` (user + system, every process): {cpu:.1f} s on {os.cpu_count()} "
          f"cores; load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
