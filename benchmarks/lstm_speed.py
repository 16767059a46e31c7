"""GateLSTM vs nn.LSTM speed, as ratios measured in the same process.

    python benchmarks/lstm_speed.py [--reps 10] [--threads 2] [--variants plain,bidirectional,proj]

Rows are timed interleaved (one rep of each in turn, in a shuffled order), medians after warm-up, so machine noise
hits every row alike. Each variant (plain, bidirectional=True, proj_size=hidden/4) compares GateLSTM with an nn.LSTM
of the same options. Targets: GateLSTM train step <= 1.0x nn.LSTM's (it is nn.LSTM's own forward after the
argument checks); forward with traces <= 2.5x nn.LSTM's forward. Ratios vary by CPU.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import time

# as `python -m pipeline` runs: large tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE=0 to compare)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from torch import nn

from pipeline.lstm import GateLSTM, reference_lstm  # noqa: E402

VARIANTS = {"plain": lambda hidden: {}, "bidirectional": lambda hidden: {"bidirectional": True},
            "proj": lambda hidden: {"proj_size": hidden // 4}}


def rows(batch: int, seq: int, inp: int, hidden: int, device: str, options: dict):
    torch.manual_seed(0)
    ref = nn.LSTM(inp, hidden, batch_first=True, **options).to(device)
    ours = GateLSTM(inp, hidden, batch_first=True, **options).to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(batch, seq, inp, device=device)

    def train_step(m):
        def run():
            out = m(x)[0]
            out.sum().backward()
        return run

    def forward(m, **kw):
        def run():
            with torch.no_grad():
                m(x, **kw)
        return run

    def naive():
        with torch.no_grad():
            reference_lstm(ours, x)

    return {
        "nn.LSTM forward+backward": train_step(ref),
        "GateLSTM forward+backward": train_step(ours),
        "nn.LSTM forward": forward(ref),
        "GateLSTM forward with traces": forward(ours, return_gates=True),
        "per-step loop with gates (forward)": naive,
    }


def measure(fns: dict, reps: int, device: str) -> dict[str, float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    order = list(fns)
    for rep in range(reps + 2):  # two warm-up rounds
        random.Random(rep).shuffle(order)  # no row always follows the same neighbour (caches, allocator)
        for name in order:
            fn = fns[name]
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if rep >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="64x100x64x256,64x1000x64x256",
                    help="batch x seq x input x hidden, comma-separated")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, reps {args.reps}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}")
    for size, variant in itertools.product(args.sizes.split(","), args.variants.split(",")):
        b, t, i, h = (int(v) for v in size.split("x"))
        options = VARIANTS[variant](h)
        med = measure(rows(b, t, i, h, args.device, options), args.reps, args.device)
        train_ref, fwd_ref = med["nn.LSTM forward+backward"], med["nn.LSTM forward"]
        print(f"\n(batch {b}, seq {t}, input {i}, hidden {h}{''.join(f', {k}={v}' for k, v in options.items())})")
        print("| row | median ms | ratio |")
        print("|---|---:|---:|")
        for name, sec in med.items():
            base = train_ref if "backward" in name else fwd_ref
            print(f"| {name} | {sec * 1e3:.1f} | {sec / base:.2f}x |")


if __name__ == "__main__":
    main()
