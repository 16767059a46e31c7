"""benchmarks/gpu_check.py stays runnable without a GPU: its CPU dry run does every check, tiny."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_dry_run_passes_its_checks():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-dry-run"], env=env,
                          capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    row = re.search(r"^\| 4x6x3x8 \| ([0-9.e+-]+) \| ([0-9.e+-]+) \| ([0-9.]+)x \| ([0-9.]+)x \|$", proc.stdout, re.M)
    assert row, proc.stdout
    assert float(row[1]) <= 1e-5 and float(row[2]) <= 1e-5  # GateLSTM equals nn.LSTM, gradients included
    assert "bitwise equal: yes" in proc.stdout and "all checks passed: yes" in proc.stdout
    assert "1 vs N GPUs: skipped" in proc.stdout
