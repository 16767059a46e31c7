"""The traced forward that reads the gates from oneDNN's LSTM workspace (pipeline.lstm._kernel_pass).

Every case is checked against the per-step reference (`reference_lstm`, the walk-through cell) or against the
recovery path (one matrix product over all steps), and each test asserts which path ran, so that a silent fallback
cannot pass for the fast path. The kernel runs in small chunks of steps here (a few steps per call), so carrying
the state across calls is exercised too.
"""

import pytest
import torch

import pipeline.lstm as lstm_mod
from pipeline.lstm import GateLSTM, reference_lstm

NAMES = ("input_gate", "forget_gate", "candidate", "output_gate", "cell", "hidden")

pytestmark = pytest.mark.skipif(not lstm_mod._KERNEL_GATES, reason="this torch build has no oneDNN RNN kernel")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the kernel path's calls (one per layer and direction); forces 3-step chunks."""
    calls = []
    real = lstm_mod._kernel_direction

    def counted(*args, **kwargs):
        calls.append(args[7])
        return real(*args, **kwargs)

    monkeypatch.setattr(lstm_mod, "_kernel_direction", counted)
    monkeypatch.setattr(lstm_mod, "_KERNEL_GATES", True)
    monkeypatch.setattr(lstm_mod, "_CHUNK_BYTES", 3 * 16)  # bytes per step are B * 4H * 16: see below
    return calls


def chunked(module, batch):
    """Set the chunk to 3 steps for this module's sizes."""
    lstm_mod._CHUNK_BYTES = 3 * batch * 4 * module.hidden_size * 16


def model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return GateLSTM(3, 5, batch_first=True, **kwargs).eval()


def assert_trace_close(trace, ref_trace, atol=1e-5):
    for name in NAMES:
        torch.testing.assert_close(getattr(trace, name), getattr(ref_trace, name), atol=atol, rtol=0, equal_nan=True,
                                   msg=name)


@pytest.mark.parametrize("layers,bidirectional,bias", [(1, False, True), (2, False, True), (1, True, True),
                                                       (2, True, True), (2, True, False)])
def test_kernel_gates_equal_the_per_step_reference(kernel_calls, layers, bidirectional, bias):
    ours = model(num_layers=layers, bidirectional=bidirectional, bias=bias, seed=layers)
    D = 2 if bidirectional else 1
    x = torch.randn(4, 11, 3)
    state = (torch.randn(layers * D, 4, 5), torch.randn(layers * D, 4, 5))
    chunked(ours, 4)
    with torch.no_grad():
        out, (h_n, c_n), trace = ours(x, state, return_gates=True)
    assert len(kernel_calls) == layers * D and set(kernel_calls) == {3}, "the kernel path, 3 steps per call"
    ref_out, (ref_h, ref_c), ref_trace = reference_lstm(ours, x, state)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_n, ref_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_n, ref_c, atol=1e-5, rtol=0)
    assert_trace_close(trace, ref_trace)
    assert trace.reconstruction_error < 1e-5
    assert trace.mask.all() and trace.num_directions == D
    torch.testing.assert_close(out, torch.nn.LSTM.forward(ours, x, state)[0], atol=1e-6, rtol=0)  # nn.LSTM's own


@pytest.mark.parametrize("bidirectional", [False, True])
def test_kernel_gates_with_lengths_equal_the_recovery_path(kernel_calls, monkeypatch, bidirectional):
    """Padded input with lengths=: the dense kernel runs over the padding (after each sequence; the reverse
    direction reads each sequence reversed within its length), and everything past a length is masked out."""
    ours = model(num_layers=2, bidirectional=bidirectional, seed=4)
    D = 2 if bidirectional else 1
    x = torch.randn(4, 10, 3)
    x[3, 1:] = float("nan")  # padding may hold anything
    lengths = torch.tensor([10, 4, 7, 1])
    state = (torch.randn(2 * D, 4, 5), torch.randn(2 * D, 4, 5))
    chunked(ours, 4)
    with torch.no_grad():
        out, (h_n, c_n), trace = ours(x, state, lengths=lengths, return_gates=True)
    assert len(kernel_calls) == 2 * D
    monkeypatch.setattr(lstm_mod, "_KERNEL_GATES", False)
    with torch.no_grad():
        ref_out, (ref_h, ref_c), ref_trace = ours(x, state, lengths=lengths, return_gates=True)
    assert len(kernel_calls) == 2 * D, "the recovery path ran"
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)  # zeros past each length, as pad_packed_sequence
    torch.testing.assert_close(h_n, ref_h, atol=1e-6, rtol=0)
    torch.testing.assert_close(c_n, ref_c, atol=1e-6, rtol=0)
    assert_trace_close(trace, ref_trace, atol=1e-6)  # NaN at the same (padded) places
    assert torch.equal(trace.mask, ref_trace.mask)
    assert trace.reconstruction_error < 1e-5
    for b, n in enumerate(lengths.tolist()):  # and each sequence as if alone, against the reference cell
        alone = tuple(s[:, b : b + 1] for s in state)
        _, (h_b, c_b), trace_b = reference_lstm(ours, x[b : b + 1, :n], alone)
        torch.testing.assert_close(h_n[:, b], h_b[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(c_n[:, b], c_b[:, 0], atol=1e-5, rtol=0)
        for name in NAMES:
            torch.testing.assert_close(getattr(trace, name)[:, b, :n], getattr(trace_b, name)[:, 0], atol=1e-5,
                                       rtol=0, msg=name)


def test_kernel_gates_unbatched_and_time_major(kernel_calls):
    torch.manual_seed(6)
    ours = GateLSTM(3, 5, 2, bidirectional=True).eval()  # batch_first=False
    x = torch.randn(7, 3)  # unbatched (time, input)
    chunked(ours, 1)
    with torch.no_grad():
        out, (h_n, c_n), trace = ours(x, return_gates=True)
    assert len(kernel_calls) == 4
    ref_out, (ref_h, ref_c), ref_trace = reference_lstm(ours, x[None])
    assert out.shape == (7, 10) and h_n.shape == (4, 5)
    torch.testing.assert_close(out, ref_out[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(c_n, ref_c[:, 0], atol=1e-5, rtol=0)
    assert_trace_close(trace, ref_trace)


def test_kernel_gates_train_mode_gradients_and_dropout(kernel_calls):
    """With a graph: the output's gradients are nn.LSTM's, and dropout between layers draws nn.LSTM's masks."""
    torch.manual_seed(8)
    ref = torch.nn.LSTM(3, 5, 3, batch_first=True, bidirectional=True, dropout=0.5)
    ours = GateLSTM(3, 5, 3, batch_first=True, bidirectional=True, dropout=0.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 3)
    chunked(ours, 2)
    torch.manual_seed(1)
    out_r = ref(x)[0]
    out_r.pow(2).sum().backward()
    torch.manual_seed(1)
    out, _, trace = ours(x, return_gates=True)
    out.pow(2).sum().backward()
    assert len(kernel_calls) == 6
    torch.testing.assert_close(out, out_r, atol=1e-6, rtol=0)
    for p, p_r in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_r.grad, atol=1e-5, rtol=1e-5)
    assert trace.reconstruction_error < 1e-5 and not trace.cell.requires_grad


def test_layout_check_falls_back_to_recovery(kernel_calls, monkeypatch):
    """Where the workspace does not hold the gates as expected (a wrong row width here), the traced forward
    recovers them by the matrix product instead, with the same results, and stops trying the workspace."""
    ours = model(num_layers=2, bidirectional=True, seed=9)
    x = torch.randn(4, 9, 3)
    with torch.no_grad():
        expected = ours(x, return_gates=True)
    monkeypatch.setattr(lstm_mod, "_workspace_ld", lambda G: G + 8)
    with torch.no_grad():
        out, _, trace = ours(x, return_gates=True)
    assert not lstm_mod._KERNEL_GATES
    torch.testing.assert_close(out, expected[0], atol=1e-6, rtol=0)
    assert_trace_close(trace, expected[2], atol=1e-6)


@pytest.mark.parametrize("case", ["float64", "proj_size", "packed", "autocast", "lengths_with_graph"])
def test_recovery_path_where_the_kernel_does_not_apply(kernel_calls, case):
    kwargs = {"proj_size": 2} if case == "proj_size" else {}
    ours = model(num_layers=2, seed=10, **kwargs)
    x = torch.randn(3, 6, 3)
    if case == "float64":
        ours, x = ours.double(), x.double()
    lengths = torch.tensor([6, 2, 4])
    if case == "packed":
        x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            result = ours(x, return_gates=True)
    elif case == "lengths_with_graph":
        result = ours(x, lengths=lengths, return_gates=True)
    else:
        with torch.no_grad():
            result = ours(x, return_gates=True)
    assert kernel_calls == []
    assert result[2].reconstruction_error < (3e-2 if case == "autocast" else 1e-5)
