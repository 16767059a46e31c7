"""The GPU check: GateLSTM on cuDNN, deterministic training, and 1 vs N GPUs.

    python benchmarks/gpu_check.py                 # on a machine with CUDA
    python benchmarks/gpu_check.py --cpu-dry-run   # the same checks, tiny, on CPU (the tests run this)

1. GateLSTM vs nn.LSTM (cuDNN on a GPU) with the same weights, padded batches with lengths and dense
   ones: the largest absolute difference of outputs, final states and every parameter's gradient
   (must be <= --atol), then the median time of a training step (forward + backward) and of the
   forward with gate traces, as ratios to nn.LSTM's training step and forward, measured interleaved
   in the same process.
2. Deterministic training: CUBLAS_WORKSPACE_CONFIG=:4096:8 and torch.use_deterministic_algorithms;
   a many_to_one model (two layers, dropout with per-sample masks) trained twice from the same seed
   must end bitwise equal.
3. 1 vs N GPUs, when N > 1 are present: benchmarks/one_vs_n.py (torchrun, trainer.devices=N, ddp)
   on digits and sentiment; its table (max relative train_loss difference, held-out metrics).
Exits 1 if any check fails. Prints Markdown tables for the README.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.lstm import GateLSTM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def lstm_equality(device: str, batch: int, seq: int, inp: int, hidden: int, layers: int) -> dict[str, float]:
    """Largest |GateLSTM - nn.LSTM| over outputs, states and gradients, dense and with lengths."""
    torch.manual_seed(0)
    ours = GateLSTM(inp, hidden, layers, batch_first=True).to(device)
    ref = nn.LSTM(inp, hidden, layers, batch_first=True).to(device)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(batch, seq, inp, device=device)
    lengths = torch.randint(1, seq + 1, (batch,))
    lengths[0] = seq
    worst = {}
    for case in ("dense", "lengths"):
        for m in (ours, ref):
            m.zero_grad()
        if case == "dense":
            out_a, (h_a, c_a) = ours(x)
            out_b, (h_b, c_b) = ref(x)
        else:
            out_a, (h_a, c_a) = ours(x, lengths=lengths)
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out_p, (h_b, c_b) = ref(packed)
            out_b = nn.utils.rnn.pad_packed_sequence(out_p, batch_first=True, total_length=seq)[0]
        (out_a.square().mean() + h_a.sum() + c_a.sum()).backward()
        (out_b.square().mean() + h_b.sum() + c_b.sum()).backward()
        diffs = [(out_a - out_b).abs().max(), (h_a - h_b).abs().max(), (c_a - c_b).abs().max()]
        diffs += [(a.grad - b.grad).abs().max() for a, b in zip(ours.parameters(), ref.parameters())]
        worst[case] = float(torch.stack(diffs).max().detach())
    return worst


def lstm_timing(device: str, batch: int, seq: int, inp: int, hidden: int, reps: int) -> dict[str, float]:
    torch.manual_seed(0)
    ours = GateLSTM(inp, hidden, batch_first=True).to(device)
    ref = nn.LSTM(inp, hidden, batch_first=True).to(device)
    x = torch.randn(batch, seq, inp, device=device)

    def step(m):
        def run():
            out, _ = m(x)
            out.sum().backward()
        return run

    def forward(m, **kw):
        def run():
            with torch.no_grad():
                m(x, **kw)
        return run

    fns = {"nn.LSTM training step": step(ref), "GateLSTM training step": step(ours),
           "nn.LSTM forward": forward(ref), "GateLSTM forward with traces": forward(ours, return_gates=True)}
    times = {name: [] for name in fns}
    order = list(fns)
    for rep in range(reps + 2):  # two warm-up rounds, then interleaved in a shuffled order
        random.Random(rep).shuffle(order)
        for name in order:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            if rep >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_once(device: str, steps: int, hidden: int) -> dict[str, torch.Tensor]:
    """A two-layer many_to_one model with dropout (per-sample masks), trained `steps` Adam steps."""
    from pipeline.models import randomness
    from pipeline.models.many_to_one import ManyToOne

    torch.manual_seed(0)
    model = ManyToOne(vocab={"labels": ["a", "b", "c"]}, dims={"input_shape": [20, 6]},
                      model={"hidden_size": hidden, "num_layers": 2, "dropout": 0.3},
                      train={"batch_size": 16}).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(16, 20, 6, generator=gen).to(device)
        y = torch.randint(0, 3, (16,), generator=gen).to(device)
        lengths = torch.randint(5, 21, (16,), generator=gen)
        with randomness.per_sample(7, 0, torch.arange(step * 16, step * 16 + 16, device=device)):
            loss, count = model.loss_terms({"x": x, "y": y, "lengths": lengths.to(device)})
        opt.zero_grad()
        (loss / count).backward()
        opt.step()
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def deterministic(device: str, steps: int, hidden: int) -> bool:
    torch.use_deterministic_algorithms(True)
    try:
        a, b = train_once(device, steps, hidden), train_once(device, steps, hidden)
    finally:
        torch.use_deterministic_algorithms(False)
    return all(torch.equal(a[k], b[k]) for k in a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU: the checks run, no GPU needed")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--atol", type=float, default=1e-5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"), help="folder for the 1 vs N runs")
    args = ap.parse_args()
    if args.cpu_dry_run:
        device, sizes, reps, steps, hidden = "cpu", [(4, 6, 3, 8)], 1, 3, 8
    elif torch.cuda.is_available():
        device, sizes, reps, steps, hidden = "cuda", [(64, 100, 64, 256), (64, 1000, 64, 256)], args.reps, 50, 128
    else:
        print("no CUDA device: run with --cpu-dry-run to check the script on CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    cudnn = torch.backends.cudnn.version() if device == "cuda" else None
    print(f"torch {torch.__version__}, {name}, cuDNN {cudnn}, CUBLAS_WORKSPACE_CONFIG="
          f"{os.environ['CUBLAS_WORKSPACE_CONFIG']}")
    ok = True
    print("\n| size (B x T x in x hidden) | max abs diff dense | max abs diff lengths | train step ratio | "
          "traced forward ratio |")
    print("|---|---:|---:|---:|---:|")
    for b, t, i, h in sizes:
        diff = lstm_equality(device, b, t, i, h, layers=2)
        med = lstm_timing(device, b, t, i, h, reps)
        train_ratio = med["GateLSTM training step"] / med["nn.LSTM training step"]
        traced_ratio = med["GateLSTM forward with traces"] / med["nn.LSTM forward"]
        ok &= max(diff.values()) <= args.atol
        print(f"| {b}x{t}x{i}x{h} | {diff['dense']:.1e} | {diff['lengths']:.1e} | {train_ratio:.2f}x | "
              f"{traced_ratio:.2f}x |")
    same = deterministic(device, steps, hidden)
    ok &= same
    print(f"\ndeterministic training ({steps} steps, two runs): bitwise equal: {'yes' if same else 'NO'}")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus > 1:
        cmd = [sys.executable, str(REPO / "benchmarks" / "one_vs_n.py"), "--work", str(args.work),
               "--nproc", str(gpus), "--accelerator", "gpu", "--tasks", "digits", "sentiment"]
        proc = subprocess.run(cmd, text=True, capture_output=True)
        print(f"\n1 vs {gpus} GPUs (benchmarks/one_vs_n.py):\n{proc.stdout}{proc.stderr[-2000:]}")
        ok &= proc.returncode == 0 and "| NO |" not in proc.stdout
    else:
        print(f"\n1 vs N GPUs: skipped ({gpus} GPU(s) present; needs 2 or more)")
    print(f"\nall checks passed: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
