"""GateLSTM vs nn.LSTM speed, as ratios measured in the same process.

    python benchmarks/lstm_speed.py [--reps 10] [--threads 2] [--variants plain,bidirectional,proj]

Rows are timed interleaved (one rep of each in turn, in a shuffled order), medians after warm-up, so machine noise
hits every row alike. Each variant (plain, bidirectional=True, proj_size=hidden/4) compares GateLSTM with an nn.LSTM
of the same options. Targets (issue #17): GateLSTM train step <= 1.0x nn.LSTM's (it is nn.LSTM's own forward after
the argument checks); forward with traces <= 2.0x nn.LSTM's forward and >= 1.5x faster than the naive per-step loop
that records gates. Ratios vary by CPU: the header names the CPU, the instruction set torch dispatches to, the one
oneDNN (the library behind nn.LSTM's CPU kernel) runs with, and the load average while it ran.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time

# as `python -m pipeline` runs: large tensors on transparent huge pages (THP_MEM_ALLOC_ENABLE=0 to compare)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from torch import nn

from pipeline.lstm import GateLSTM  # noqa: E402

VARIANTS = {"plain": lambda hidden: {}, "bidirectional": lambda hidden: {"bidirectional": True},
            "proj": lambda hidden: {"proj_size": hidden // 4}}


TARGETS = {"traced": 2.0, "loop_speedup": 1.5, "train": 1.0}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def onednn_isa() -> str:
    """The instruction set oneDNN runs nn.LSTM's kernel with, from its own verbose log (ONEDNN_VERBOSE=1) in a
    child process, e.g. 'Intel AVX-512 with AVX512BW, AVX512VL, and AVX512DQ extensions'; '?' where it says none."""
    code = "import torch; torch.nn.LSTM(2, 2)(torch.randn(1, 1, 2))"
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"}
    try:
        log = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    found = re.search(r"isa:([^\n]+)", log)
    return found.group(1).strip() if found else "?"


def onednn_version() -> str:
    found = re.search(r"(?:MKL-DNN|oneDNN)[^\n]*?v([0-9.]+)", torch.__config__.show())
    return found.group(1) if found else "?"


NAMES = ("input_gate", "forget_gate", "candidate", "output_gate", "cell", "hidden")


def per_step_loop(m: nn.LSTM, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The naive per-step loop that records gates, from a zero state over batch-first x: (output, {name: (L * D, B,
    T, size)}) as GateTrace lays them out. Each step is written as torch's own LSTMCell computes one on CPU (both
    products with their biases fused, addmm, added in place, the activations in place on the step's own buffer),
    and the trace keeps views of each step's results, stacked once per layer and direction into the output
    tensors. tests/test_lstm_kernel_gates.py holds it to `reference_lstm`."""
    B, T, _ = x.shape
    D, L, H = 2 if m.bidirectional else 1, m.num_layers, m.hidden_size
    P = m.proj_size or H
    trace = {name: x.new_empty(L * D, B, T, P if name == "hidden" else H) for name in NAMES}
    inp = x
    for k in range(L):
        for d in range(D):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(m, f"weight_ih{sfx}"), getattr(m, f"weight_hh{sfx}")
            b_ih, b_hh = (getattr(m, f"bias_ih{sfx}"), getattr(m, f"bias_hh{sfx}")) if m.bias else (None, None)
            w_hr = getattr(m, f"weight_hr{sfx}") if m.proj_size else None
            h, c = x.new_zeros(B, P), x.new_zeros(B, H)
            steps = {name: [None] * T for name in NAMES}
            for t in (range(T - 1, -1, -1) if d else range(T)):
                x_t = inp[:, t]
                if b_ih is None:
                    gates = torch.mm(x_t, w_ih.T).add_(torch.mm(h, w_hh.T))
                else:
                    gates = torch.addmm(b_ih, x_t, w_ih.T).add_(torch.addmm(b_hh, h, w_hh.T))
                i, f, g, o = gates.chunk(4, 1)
                i.sigmoid_(), f.sigmoid_(), g.tanh_(), o.sigmoid_()
                c = torch.addcmul(f * c, i, g)
                h = o * torch.tanh(c)
                if w_hr is not None:
                    h = h @ w_hr.T
                for name, value in zip(NAMES, (i, f, g, o, c, h)):
                    steps[name][t] = value
            for name in NAMES:
                torch.stack(steps[name], 1, out=trace[name][k * D + d])
        hidden = trace["hidden"][k * D : (k + 1) * D]
        inp = torch.cat(tuple(hidden), -1) if D > 1 else hidden[0]
    return inp, trace


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
            per_step_loop(ours, x)

    return {
        "nn.LSTM forward+backward": train_step(ref),
        "GateLSTM forward+backward": train_step(ours),
        "nn.LSTM forward": forward(ref),
        "GateLSTM forward with traces": forward(ours, return_gates=True),
        "per-step loop with gates (forward)": naive,
    }


def measure(fns: dict, reps: int, device: str, clock=time.perf_counter) -> dict[str, float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    order = list(fns)
    for rep in range(reps + 2):  # two warm-up rounds
        random.Random(rep).shuffle(order)  # no row always follows the same neighbour (caches, allocator)
        for name in order:
            fn = fns[name]
            sync()
            start = clock()
            fn()
            sync()
            if rep >= 2:
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="64x100x64x256,64x1000x64x256",
                    help="batch x seq x input x hidden, comma-separated")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (user + sys), which a busy shared machine "
                         "disturbs far less. Use cpu with --threads 1 only: with more threads it also counts the "
                         "threads' spin-waiting")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; oneDNN {onednn_version()} ISA: {onednn_isa()}")
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, reps {args.reps}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}, {args.clock} clock, load average at start "
          f"{os.getloadavg()[0]:.2f}")
    allocator = [f"{k}={os.environ[k]}" for k in ("GLIBC_TUNABLES", "LD_PRELOAD", "OMP_WAIT_POLICY") if k in os.environ]
    if allocator:  # settings that move these ratios (heap reuse of the kernel's workspace; spinning threads)
        print("environment: " + ", ".join(allocator))
    summary = []
    for size, variant in itertools.product(args.sizes.split(","), args.variants.split(",")):
        b, t, i, h = (int(v) for v in size.split("x"))
        options = VARIANTS[variant](h)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        med = measure(rows(b, t, i, h, args.device, options), args.reps, args.device, clock)
        train_ref, fwd_ref = med["nn.LSTM forward+backward"], med["nn.LSTM forward"]
        print(f"\n(batch {b}, seq {t}, input {i}, hidden {h}{''.join(f', {k}={v}' for k, v in options.items())})")
        print("| row | median ms | ratio |")
        print("|---|---:|---:|")
        for name, sec in med.items():
            base = train_ref if "backward" in name else fwd_ref
            print(f"| {name} | {sec * 1e3:.1f} | {sec / base:.2f}x |")
        traced = med["GateLSTM forward with traces"]
        summary.append((f"T={t} {variant}", med["GateLSTM forward+backward"] / train_ref, traced / fwd_ref,
                        med["per-step loop with gates (forward)"] / traced))
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    print(f"| case | train / nn.LSTM (<= {TARGETS['train']}x) | traced forward / nn.LSTM forward "
          f"(<= {TARGETS['traced']}x) | per-step loop / traced (>= {TARGETS['loop_speedup']}x) |")
    print("|---|---:|---:|---:|")
    for case, train, traced, speedup in summary:
        print(f"| {case} | {train:.2f}x | {traced:.2f}x | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
