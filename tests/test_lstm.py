"""GateLSTM and VanillaRNN against nn.LSTM / nn.RNN, the step-by-step reference cell, and their invariants.

The argument grid re-expresses PyTorch's own RNN tests (test/test_nn.py's RNN tests and
torch/testing/_internal/common_modules.py: module_inputs_torch_nn_LSTM, module_inputs_torch_nn_RNN_GRU
with packed sequences, module_error_inputs_torch_nn_RNN_GRU) in our own code: for every argument
combination, the same outputs, states and gradients as the torch module with the same weights, with
and without traces; for every bad argument or shape, the same exception type and message, raised
before any kernel call (tests/test_lstm_errors.py runs the crash cases in a subprocess).
"""

import inspect
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.lstm import GateLSTM, GateTrace, VanillaRNN, reference_lstm

TRACE_NAMES = ("input_gate", "forget_gate", "candidate", "output_gate", "cell", "hidden")


def twins(kind="lstm", *args, dtype=torch.float32, seed=0, **kwargs):
    """(torch module, ours) with the same weights."""
    torch.manual_seed(seed)
    ref_cls, our_cls = (nn.LSTM, GateLSTM) if kind == "lstm" else (nn.RNN, VanillaRNN)
    if kind in ("tanh", "relu"):
        kwargs["nonlinearity"] = kind
    ref = ref_cls(*args, **kwargs).to(dtype)
    ours = our_cls(*args, **kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def loss_of(out, state):
    """A loss that touches every output and every final state."""
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    states = state if isinstance(state, tuple) else (state,)
    return (out * weights).sum() + sum(s.pow(2).sum() * (j + 1) for j, s in enumerate(states))


def clone_state(state, requires_grad=True):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.clone().requires_grad_(requires_grad) for s in state)
    return state.clone().requires_grad_(requires_grad)


def state_grads(state):
    if state is None:
        return []
    return [s.grad for s in (state if isinstance(state, tuple) else (state,))]


# --- the argument grid --------------------------------------------------------------------------------------

GRID = [
    dict(kind=kind, bias=bias, batch_first=bf, bidirectional=bi, proj_size=proj, num_layers=layers, form=form,
         with_hx=with_hx)
    for kind, bias, bf, bi, proj, layers, form, with_hx in itertools.product(
        ("lstm", "tanh", "relu"), (True, False), (False, True), (False, True), (0, 2), (1, 2),
        ("dense", "unbatched", "packed"), (False, True))
    if not (kind != "lstm" and proj)  # projections are LSTM-only
    # keep the grid fast: every option is crossed with every other one for the LSTM; the RNNs skip
    # batch_first x packed (a PackedSequence ignores batch_first)
    and not (kind != "lstm" and form == "packed" and bf)
]


def make_input(form, batch_first, input_size, gen, dtype=torch.float32):
    B, T = 3, 5
    if form == "unbatched":
        return torch.randn(T, input_size, generator=gen, dtype=dtype), None
    x = torch.randn(B, T, input_size, generator=gen, dtype=dtype)
    if form == "packed":
        return pack_padded_sequence(x, torch.tensor([4, 5, 2]), batch_first=True, enforce_sorted=False), B
    return (x if batch_first else x.transpose(0, 1).contiguous()), B


def make_state(kind, B, layers, D, hidden, proj, gen, dtype=torch.float32):
    shape = (layers * D,) if B is None else (layers * D, B)
    h = torch.randn(*shape, proj or hidden, generator=gen, dtype=dtype)
    if kind == "lstm":
        return (h, torch.randn(*shape, hidden, generator=gen, dtype=dtype))
    return h


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_same_outputs_states_and_gradients_as_torch(case):
    """nn.LSTM/nn.RNN and ours with the same weights: equal outputs, final states and gradients, both with
    and without traces; the traced pass also passes its own self-check."""
    kind, layers, D = case["kind"], case["num_layers"], 2 if case["bidirectional"] else 1
    kwargs = {k: case[k] for k in ("bias", "batch_first", "bidirectional")}
    if kind == "lstm":
        kwargs["proj_size"] = case["proj_size"]
    I, H = 3, 4
    ref, ours = twins(kind, I, H, layers, seed=len(str(case)), **kwargs)
    gen = torch.Generator().manual_seed(7)
    x, B = make_input(case["form"], case["batch_first"], I, gen)
    hx = make_state(kind, B, layers, D, H, case["proj_size"], gen) if case["with_hx"] else None

    def run(module, **kw):
        module.zero_grad()
        data = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x
        xin = data.clone().requires_grad_()
        arg = nn.utils.rnn.PackedSequence(xin, x.batch_sizes, x.sorted_indices, x.unsorted_indices) \
            if isinstance(x, nn.utils.rnn.PackedSequence) else xin
        state = clone_state(hx)
        result = module(arg, state, **kw)
        loss_of(result[0], result[1]).backward()
        grads = [xin.grad, *state_grads(state)] + [p.grad for p in module.parameters()]
        return result, grads

    (out_r, state_r), grads_r = run(ref)
    for kw in ({}, {"return_gates": True}):
        result, grads = run(ours, **kw)
        out, state = result[0], result[1]
        if isinstance(out_r, nn.utils.rnn.PackedSequence):
            assert torch.equal(out.batch_sizes, out_r.batch_sizes)
            out, out_ref = out.data, out_r.data
        else:
            out_ref = out_r
        torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=0)
        for a, b in zip(state if kind == "lstm" else (state,), state_r if kind == "lstm" else (state_r,)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        for g, g_r in zip(grads, grads_r):
            torch.testing.assert_close(g, g_r, atol=1e-5, rtol=1e-5)
        if kw:
            trace = result[2]
            assert trace.num_directions == D and trace.hidden.shape[0] == layers * D
            assert trace.reconstruction_error < 1e-5
            assert not any(t.requires_grad for _, t in trace.items())


@pytest.mark.parametrize("kind", ["lstm", "tanh"])
def test_inter_layer_dropout_draws_as_torch(kind):
    """Train mode, dropout 0.5 between 3 layers: with the same seed, the traced layer-by-layer pass draws the
    masks nn.LSTM/nn.RNN draw (the untraced pass is nn.LSTM's own forward)."""
    ref, ours = twins(kind, 4, 16, 3, dropout=0.5, batch_first=True, bidirectional=True)
    x = torch.randn(2, 6, 4)
    torch.manual_seed(3)
    expected = ref(x)[0]
    for kw in ({}, {"return_gates": True}):
        torch.manual_seed(3)
        result = ours(x, **kw)
        torch.testing.assert_close(result[0], expected, atol=1e-6, rtol=0)
    torch.manual_seed(4)
    assert not torch.allclose(ours(x)[0], expected), "another seed, other masks"
    assert result[2].reconstruction_error < 1e-5  # the trace used the dropped input the kernel saw
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes(dtype):
    ref, ours = twins("lstm", 4, 3, 2, dtype=dtype, batch_first=True, bidirectional=True)
    x = torch.randn(2, 6, 4, dtype=dtype)
    out, _, trace = ours(x, return_gates=True)
    assert out.dtype == trace.cell.dtype == dtype
    torch.testing.assert_close(out, ref(x)[0], atol=1e-12 if dtype == torch.float64 else 1e-2, rtol=0)
    assert trace.reconstruction_error < (1e-12 if dtype == torch.float64 else 2e-2)


# --- traces against the reference cell, per direction ----------------------------------------------------------


@pytest.mark.parametrize("bias,bidirectional,proj_size,num_layers",
                         [(True, False, 0, 1), (True, False, 0, 2), (True, True, 0, 2), (False, True, 2, 2),
                          (True, False, 3, 1)])
def test_trace_equals_reference_cell(bias, bidirectional, proj_size, num_layers):
    _, ours = twins("lstm", 6, 5, num_layers, bias=bias, batch_first=True, bidirectional=bidirectional,
                    proj_size=proj_size, seed=3)
    D, P = 2 if bidirectional else 1, proj_size or 5
    x = torch.randn(3, 12, 6)
    state = (torch.randn(num_layers * D, 3, P), torch.randn(num_layers * D, 3, 5))
    out, (h_n, c_n), trace = ours(x, state, return_gates=True)
    ref_out, (ref_h, ref_c), ref_trace = reference_lstm(ours, x, state)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_n, ref_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_n, ref_c, atol=1e-5, rtol=0)
    for name in TRACE_NAMES:
        got = getattr(trace, name)
        assert got.shape == (num_layers * D, 3, 12, P if name == "hidden" else 5), name
        torch.testing.assert_close(got, getattr(ref_trace, name), atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("kind", ["tanh", "relu"])
def test_rnn_trace_is_each_layers_output(kind):
    """Entry (layer k, direction d) of the hidden trace is the output of the first k+1 layers, direction d."""
    ref, ours = twins(kind, 3, 5, 2, batch_first=True, bidirectional=True, seed=2)
    x = torch.randn(2, 7, 3)
    out, h_n, trace = ours(x, return_gates=True)
    assert isinstance(trace, GateTrace) and trace.forget_gate is None and trace.num_directions == 2
    one = nn.RNN(3, 5, 1, nonlinearity=kind, batch_first=True, bidirectional=True)
    one.load_state_dict({k: v for k, v in ref.state_dict().items() if "_l0" in k})
    for k, layer_out in enumerate((one(x)[0], out)):
        for d in range(2):
            torch.testing.assert_close(trace.hidden[2 * k + d], layer_out[..., d * 5 : (d + 1) * 5], atol=1e-6, rtol=0)
    assert trace.reconstruction_error < 1e-5


def test_trace_invariants():
    _, ours = twins("lstm", 4, 16, 2, batch_first=True, seed=5)
    x = 3 * torch.randn(5, 30, 4)  # large inputs push gates towards saturation
    out, (h_n, c_n), trace = ours(x, return_gates=True)
    for name in ("input_gate", "forget_gate", "output_gate"):
        g = getattr(trace, name)
        assert bool(((g > 0) & (g < 1)).all()), name
    assert bool((trace.candidate.abs() < 1).all())
    torch.testing.assert_close(trace.hidden, trace.output_gate * torch.tanh(trace.cell), atol=1e-6, rtol=0)
    c_prev = torch.cat([torch.zeros(2, 5, 1, 16), trace.cell[:, :, :-1]], dim=2)
    torch.testing.assert_close(trace.cell, trace.forget_gate * c_prev + trace.input_gate * trace.candidate,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.hidden[-1], out, atol=0, rtol=0)
    torch.testing.assert_close(trace.cell[:, :, -1], c_n, atol=1e-6, rtol=0)
    assert trace.reconstruction_error < 1e-5
    assert not any(t.requires_grad for _, t in trace.items())


@pytest.mark.parametrize("bidirectional", [False, True])
def test_variable_lengths_equal_running_each_sequence_alone(bidirectional):
    ref, ours = twins("lstm", 3, 6, 2, batch_first=True, bidirectional=bidirectional, seed=7)
    x = torch.randn(4, 10, 3)
    lengths = torch.tensor([10, 4, 7, 1])
    out, (h_n, c_n), trace = ours(x, lengths=lengths, return_gates=True)
    assert trace.hidden.shape[2] == 10  # the padded length
    for b, n in enumerate(lengths.tolist()):
        alone, (h_b, c_b) = ref(x[b : b + 1, :n])
        torch.testing.assert_close(out[b, :n], alone[0], atol=1e-5, rtol=0)
        assert bool((out[b, n:] == 0).all())  # padded like pad_packed_sequence
        torch.testing.assert_close(h_n[:, b], h_b[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(c_n[:, b], c_b[:, 0], atol=1e-5, rtol=0)
        _, _, trace_b = ours(x[b : b + 1, :n], return_gates=True)
        for name in TRACE_NAMES:
            full = getattr(trace, name)[:, b]
            torch.testing.assert_close(full[:, :n], getattr(trace_b, name)[:, 0], atol=1e-5, rtol=0, msg=name)
            assert bool(full[:, n:].isnan().all()), f"{name} past the end must be NaN"
    assert trace.mask.sum(1).tolist() == lengths.tolist()
    assert ours(x, lengths=lengths)[0].equal(out)  # the untraced pass gives the same output


def test_packed_sequence_trace():
    ref, ours = twins("lstm", 3, 5, 2, batch_first=True, seed=11)
    x = torch.randn(3, 8, 3)
    packed = pack_padded_sequence(x, torch.tensor([5, 8, 2]), batch_first=True, enforce_sorted=False)
    out_o, _, trace = ours(packed, return_gates=True)
    padded = pad_packed_sequence(out_o, batch_first=True)[0]
    torch.testing.assert_close(torch.nan_to_num(trace.hidden[-1]), padded, atol=1e-6, rtol=0)


# --- the self-check, autocast, gradients -----------------------------------------------------------------------


def test_self_check_reports_nan_not_zero():
    _, ours = twins("lstm", 3, 4, 1, batch_first=True)
    x = torch.randn(2, 6, 3)
    assert ours(x, return_gates=True)[2].reconstruction_error < 1e-5
    x[0, 2, 1] = float("nan")  # a NaN in a real step poisons that sequence from there on
    error = ours(x, return_gates=True)[2].reconstruction_error
    assert error != error, f"NaN in real steps must give a NaN self-check, got {error}"
    x = torch.randn(2, 6, 3)
    x[1, 5] = float("nan")  # only in padding: not a real step, so the check stays clean
    assert ours(x, lengths=torch.tensor([6, 4]), return_gates=True)[2].reconstruction_error < 1e-5


def test_bf16_autocast_trace_is_float32():
    ref, ours = twins("lstm", 4, 8, 2, batch_first=True)
    x = torch.randn(2, 9, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h_n, _), trace = ours(x, return_gates=True)
        out_r = ref(x)[0]
    assert out.dtype == out_r.dtype == torch.bfloat16
    assert trace.cell.dtype == trace.hidden.dtype == torch.float32  # the parameters' dtype, as documented
    torch.testing.assert_close(trace.hidden[-1], out.float(), atol=0, rtol=0)  # h from the bf16 kernel
    assert trace.reconstruction_error < 3e-2  # bf16 rounding, no more


# --- the module's surface ------------------------------------------------------------------------------------


def test_constructor_signature_and_defaults_are_nn_lstms():
    ours = inspect.signature(GateLSTM.__init__).parameters
    theirs = inspect.signature(nn.modules.rnn.RNNBase.__init__).parameters
    assert [(n, p.default) for n, p in ours.items()] == [(n, p.default) for n, p in theirs.items() if n != "mode"]
    assert GateLSTM(3, 5, 2, False).bias is False  # the 4th positional argument is bias
    assert GateLSTM(3, 5).batch_first is False
    assert VanillaRNN(3, 5, 1, "relu", False).bias is False
    assert isinstance(GateLSTM(3, 5), nn.LSTM) and isinstance(VanillaRNN(3, 5), nn.RNN)
    assert GateLSTM(3, 5, dtype=torch.float64).weight_ih_l0.dtype == torch.float64


@pytest.mark.parametrize("kwargs", [dict(num_layers=2, bidirectional=True, proj_size=2), dict(bias=False)])
def test_state_dicts_weights_and_flatten(kwargs):
    ref, ours = twins("lstm", 3, 4, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    fresh = nn.LSTM(3, 4, **kwargs)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    assert [[w.shape for w in layer] for layer in ours.all_weights] == \
        [[w.shape for w in layer] for layer in ref.all_weights]
    ours.flatten_parameters()
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(ours(x)[0], fresh(x)[0])


def test_torch_jit_script_refuses_clearly():
    with pytest.raises(RuntimeError, match="cannot be scripted with torch.jit.script"):
        torch.jit.script(GateLSTM(3, 4))


def test_lengths_errors():
    lstm = GateLSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    for lengths, match in [(torch.tensor([5]), "2 lengths"), (torch.tensor([5, 6]), r"in \[1, 5\]"),
                           (torch.tensor([0, 5]), r"in \[1, 5\]"), (torch.tensor([2.0, 5.0]), "integer")]:
        with pytest.raises(ValueError, match=match):
            lstm(x, lengths=lengths)
    with pytest.raises(ValueError, match="batched 3-D"):
        lstm(x[0], lengths=torch.tensor([5]))
    with pytest.raises(ValueError, match="PackedSequence"):
        lstm(pack_padded_sequence(x, torch.tensor([5, 2]), batch_first=True), lengths=torch.tensor([5, 2]))


@pytest.mark.slow  # compiling takes 15-90 s on a 2-core CPU (cold cache)
def test_torch_compile_trains_and_traces():
    """Dynamo graph-breaks on nn.LSTM and its subclasses, so the fused call runs eagerly between compiled
    graphs: compiled gradients equal eager ones, and return_gates works inside a compiled model (bidirectional:
    the reverse direction's reordering, which once failed to trace with symbolic sizes)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.head = nn.Linear(3, 4), nn.Linear(12, 2)
            self.lstm = GateLSTM(4, 6, 2, batch_first=True, bidirectional=True)

        def forward(self, x, gates: bool = False):
            result = self.lstm(torch.tanh(self.inp(x)), return_gates=gates)
            logits = self.head(result[0][:, -1])
            return (logits, result[2]) if gates else logits

    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 5, 3)
    compiled = torch.compile(net)
    compiled(x).pow(2).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x).pow(2).sum().backward()
    for g, p in zip(grads, net.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)
    logits, trace = compiled(x, True)
    _, eager_trace = net(x, True)
    torch.testing.assert_close(logits, net(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(trace.forget_gate, eager_trace.forget_gate, atol=1e-6, rtol=0)
    assert trace.reconstruction_error < 1e-5
