"""Bad arguments and shapes: GateLSTM/VanillaRNN raise nn.LSTM's/nn.RNN's exception, with its message, and never
crash the interpreter (PyTorch's module_error_inputs_torch_nn_RNN_GRU, re-expressed and extended with the
shapes that once crashed the fused kernel: a state batch that differs from the input's segfaulted).

Every case runs in a subprocess, ours and torch's alike, so a crash is a failed test, not a dead pytest. A case
that crashes torch's own module (PackedSequence input skips nn.LSTM's checks) is expected to raise in ours with
the message nn.LSTM gives for the same shapes in a padded tensor.
"""

import json
import os
import subprocess
import sys

import pytest

# (id, constructor, forward call or None). `M`: the module class, `m`: the module, `P`/`S`: pack a batch-first
# tensor (unsorted / sorted lengths).
X = "torch.randn(4, 3, 3)"  # time-major: 4 steps, batch 3, 3 features
Z = "torch.zeros"
LSTM_CASES = [
    ("hidden_size 0", "M(10, 0, 1)", None),
    ("num_layers 0", "M(10, 10, 0)", None),
    ("input_size 0", "M(0, 10)", None),
    ("dropout 1.5", "M(10, 10, dropout=1.5)", None),
    ("dropout bool", "M(10, 10, dropout=True)", None),
    ("bias not bool", "M(10, 10, 1, 1)", None),
    ("batch_first not bool", "M(10, 10, batch_first='yes')", None),
    ("input_size float", "M(10.0, 10)", None),
    ("hidden_size float", "M(10, 2.5)", None),
    ("proj_size negative", "M(10, 10, proj_size=-1)", None),
    ("proj_size too large", "M(10, 10, proj_size=10)", None),
    ("input dtype", "M(3, 5, 2)", "m(torch.randn(4, 3, 3, dtype=torch.float64))"),
    ("input 4-D", "M(3, 5, 2)", "m(torch.randn(4, 3, 3, 1))"),
    ("input 1-D", "M(3, 5, 2)", "m(torch.randn(3))"),
    ("feature count", "M(3, 5, 2)", "m(torch.randn(4, 3, 7))"),
    ("state batch 1, input batch 3", "M(3, 5, 2)", f"m({X}, ({Z}(2, 1, 5), {Z}(2, 1, 5)))"),
    ("state batch 2, input batch 3", "M(3, 5, 2)", f"m({X}, ({Z}(2, 2, 5), {Z}(2, 2, 5)))"),
    ("state batch 5, input batch 3", "M(3, 5, 1)", f"m({X}, ({Z}(1, 5, 5), {Z}(1, 5, 5)))"),
    ("h 4 wide for hidden 5", "M(3, 5, 2)", f"m({X}, ({Z}(2, 3, 4), {Z}(2, 3, 5)))"),
    ("extra layers in state", "M(3, 5, 2)", f"m({X}, ({Z}(3, 3, 5), {Z}(3, 3, 5)))"),
    ("c 6 wide", "M(3, 5, 2)", f"m({X}, ({Z}(2, 3, 5), {Z}(2, 3, 6)))"),
    ("2-D state, batched input", "M(3, 5, 2)", f"m({X}, ({Z}(2, 5), {Z}(2, 5)))"),
    ("3-D state, unbatched input", "M(3, 5, 2)", f"m(torch.randn(4, 3), ({Z}(2, 3, 5), {Z}(2, 3, 5)))"),
    ("unbatched state batch", "M(3, 5, 2)", f"m(torch.randn(4, 3), ({Z}(2, 4), {Z}(2, 5)))"),
    ("projected h full width", "M(3, 5, proj_size=2)", f"m({X}, ({Z}(1, 3, 5), {Z}(1, 3, 5)))"),
    ("bidirectional, one direction of state", "M(3, 5, bidirectional=True)", f"m({X}, ({Z}(1, 3, 5), {Z}(1, 3, 5)))"),
    ("batch_first state batch", "M(3, 5, batch_first=True)", f"m(torch.randn(2, 4, 3), ({Z}(1, 4, 5), {Z}(1, 4, 5)))"),
    ("state dtype", "M(3, 5)", f"m({X}, ({Z}(1, 3, 5, dtype=torch.float64), {Z}(1, 3, 5)))"),
    ("packed, state batch 1", "M(3, 5, 2)", f"m(P(torch.randn(3, 4, 3)), ({Z}(2, 1, 5), {Z}(2, 1, 5)))"),
    ("packed, feature count", "M(3, 5, 2)", "m(P(torch.randn(3, 4, 7)))"),
    ("packed sorted, state batch 1", "M(3, 5, 2)", f"m(S(torch.randn(3, 4, 3)), ({Z}(2, 1, 5), {Z}(2, 1, 5)))"),
]
RNN_CASES = [
    ("hidden_size 0", "M(10, 0, 1)", None),
    ("num_layers 0", "M(10, 10, 0)", None),
    ("nonlinearity", "M(3, 5, nonlinearity='sigmoid')", None),
    ("proj_size", "M(3, 5, proj_size=2)", None),
    ("input dtype", "M(3, 5, 2)", "m(torch.randn(4, 3, 3, dtype=torch.float64))"),
    ("input 4-D", "M(3, 5, 2)", "m(torch.randn(4, 3, 3, 1))"),
    ("feature count", "M(3, 5, 2)", "m(torch.randn(4, 3, 7))"),
    ("state batch 1, input batch 3", "M(3, 5, 2)", f"m({X}, {Z}(2, 1, 5))"),
    ("state 4 wide", "M(3, 5, 2)", f"m({X}, {Z}(2, 3, 4))"),
    ("2-D state, batched input", "M(3, 5, 2)", f"m({X}, {Z}(2, 5))"),
    ("3-D state, unbatched input", "M(3, 5, 2)", f"m(torch.randn(4, 3), {Z}(2, 3, 5))"),
    ("packed, state batch 1", "M(3, 5, 2, nonlinearity='relu')", f"m(P(torch.randn(3, 4, 3)), {Z}(2, 1, 5))"),
    ("packed sorted, state batch 1", "M(3, 5, 2)", f"m(S(torch.randn(3, 4, 3)), {Z}(2, 1, 5))"),
]
# PackedSequence input: nn.LSTM/nn.RNN skip their checks (torch fails later in an index_select or the kernel)
UNCHECKED_BY_TORCH = {
    "GateLSTM: packed, state batch 1": "Expected hidden[0] size (2, 3, 5), got [2, 1, 5]",
    "GateLSTM: packed, feature count": "input.size(-1) must be equal to input_size. Expected 3, got 7",
    "GateLSTM: packed sorted, state batch 1": "Expected hidden[0] size (2, 3, 5), got [2, 1, 5]",
    "VanillaRNN: packed, state batch 1": "Expected hidden size (2, 3, 5), got [2, 1, 5]",
    "VanillaRNN: packed sorted, state batch 1": "Expected hidden size (2, 3, 5), got [2, 1, 5]",
}

RUNNER = r"""
import json, sys, warnings
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from pipeline.lstm import GateLSTM, VanillaRNN
warnings.simplefilter("ignore")
torch.set_num_threads(1)
M = {"nn.LSTM": nn.LSTM, "GateLSTM": GateLSTM, "nn.RNN": nn.RNN, "VanillaRNN": VanillaRNN}[sys.argv[1]]
P = lambda x: pack_padded_sequence(x, torch.tensor([4, 2, 3]), batch_first=True, enforce_sorted=False)
S = lambda x: pack_padded_sequence(x, torch.tensor([4, 3, 2]), batch_first=True)
cases = json.loads(sys.argv[2])
for start in range(int(sys.argv[3]), len(cases)):
    _, make, call = cases[start]
    results = []
    for kw in ([{}, {"return_gates": True}] if sys.argv[1] in ("GateLSTM", "VanillaRNN") and call else [{}]):
        try:
            m = eval(make)
            if call:
                call_kw = call[:-1] + (", " if "(" in call[2:-1] else "") + "**kw)" if kw else call
                eval(call_kw)
            results.append(None)
        except Exception as e:
            results.append([type(e).__name__, str(e)])
    print(json.dumps([start, results]), flush=True)
"""


def outcomes(cls: str, cases) -> list:
    """Per case: [error type, message] per forward kind, None where it ran, or 'crash' (died on a signal)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    spec = json.dumps([list(c) for c in cases])
    found, start = {}, 0
    while start < len(cases):
        proc = subprocess.run([sys.executable, "-c", RUNNER, cls, spec, str(start)], capture_output=True, text=True,
                              timeout=120, env=env)
        for line in proc.stdout.splitlines():
            index, results = json.loads(line)
            found[index] = results
        if proc.returncode == 0:
            break
        assert proc.returncode < 0, f"{cls} runner failed without a signal:\n{proc.stderr[-2000:]}"
        start = max(found, default=-1) + 1
        found[start] = "crash"
        start += 1
    return [found[i] for i in range(len(cases))]


@pytest.mark.parametrize("ours,theirs,cases",
                         [("GateLSTM", "nn.LSTM", LSTM_CASES), ("VanillaRNN", "nn.RNN", RNN_CASES)],
                         ids=["lstm", "rnn"])
def test_bad_inputs_raise_torchs_errors_never_crash(ours, theirs, cases):
    mine, ref = outcomes(ours, cases), outcomes(theirs, cases)
    for (name, _, _), got, expected in zip(cases, mine, ref):
        assert got != "crash", f"{ours}: {name} crashed the interpreter"
        for kind in got:
            assert kind is not None, f"{ours}: {name} raised nothing ({expected=})"
            assert kind[0] in ("ValueError", "RuntimeError", "TypeError"), (name, kind)
            if f"{ours}: {name}" in UNCHECKED_BY_TORCH:  # torch's message for the same shapes, padded
                assert kind == ["RuntimeError", UNCHECKED_BY_TORCH[f"{ours}: {name}"]], (name, kind, expected)
            elif expected == "crash" or expected[0] is None:
                raise AssertionError(f"torch's {theirs} no longer raises on {name}: {expected}; review the case")
            else:
                assert kind == expected[0], f"{name}: {kind} != torch's {expected[0]}"
