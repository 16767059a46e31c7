"""The traced forward that reads the gates and cells from oneDNN's LSTM workspace (pipeline.lstm._kernel_pass).

Every case is checked against the per-step reference (`reference_lstm`, the walk-through cell) or against the
recovery path (one matrix product over all steps), and each test asserts which path ran, so that a silent fallback
cannot pass for the fast path. Two forms are covered: one layer and direction without a graph, where the trace is
views into one kernel call's workspace, and everything else, where the kernel runs a few steps per call (3 here,
so carrying the state across calls is exercised) and each call's rows are copied into the trace.
"""

import copy
import importlib.util
import pickle
import threading
import weakref
from pathlib import Path

import pytest
import torch

import pipeline.lstm as lstm_mod
from pipeline.lstm import GateLSTM, reference_lstm

NAMES = ("input_gate", "forget_gate", "candidate", "output_gate", "cell", "hidden")

pytestmark = pytest.mark.skipif(not lstm_mod._KERNEL_GATES, reason="this torch build has no oneDNN RNN kernel")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the steps of every kernel call; a fresh layout-check memory and buffer pool; 3-step calls where the
    trace is copied (see `chunked`)."""
    calls = []
    real = lstm_mod._kernel_call

    def counted(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(lstm_mod, "_kernel_call", counted)
    monkeypatch.setattr(lstm_mod, "_KERNEL_GATES", True)
    monkeypatch.setattr(lstm_mod, "_TRACE_VIEWS", True)
    monkeypatch.setattr(lstm_mod, "_VERIFIED", set())
    monkeypatch.setattr(lstm_mod, "_POOL", {})
    monkeypatch.setattr(lstm_mod, "_CHUNK_BYTES", 3 * 16)  # bytes per step are B * 4H * 16: see below
    return calls


def chunked(module, batch):
    """Set the chunk to 3 steps for this module's sizes (where the trace is copied out)."""
    lstm_mod._CHUNK_BYTES = 3 * batch * 4 * module.hidden_size * 16


def model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return GateLSTM(3, 5, batch_first=True, **kwargs).eval()


def assert_trace_close(trace, ref_trace, atol=1e-5):
    for name in NAMES:
        torch.testing.assert_close(getattr(trace, name), getattr(ref_trace, name), atol=atol, rtol=0, equal_nan=True,
                                   msg=name)


def storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("layers,bidirectional,bias,views,proj", [
    (1, False, True, True, 0), (1, False, False, True, 0), (1, False, True, False, 0), (2, False, True, False, 0),
    (1, True, True, False, 0), (2, True, True, False, 0), (2, True, False, False, 0),
    (1, False, True, True, 2), (1, False, False, False, 2), (2, True, True, False, 2), (1, True, False, False, 3)])
@pytest.mark.parametrize("zero_h0", [False, True])
def test_kernel_gates_equal_the_per_step_reference(kernel_calls, monkeypatch, layers, bidirectional, bias, views,
                                                   proj, zero_h0):
    """proj > 0: projections run as the kernel's LSTM with recurrent weights W_hh W_hr (`_projected`); a nonzero
    h_0 enters through the first processed step's input, a zero one is left out."""
    monkeypatch.setattr(lstm_mod, "_TRACE_VIEWS", views)
    ours = model(num_layers=layers, bidirectional=bidirectional, bias=bias, seed=layers, proj_size=proj)
    D = 2 if bidirectional else 1
    x = torch.randn(4, 11, 3)
    state = (torch.randn(layers * D, 4, proj or 5), torch.randn(layers * D, 4, 5))
    if zero_h0:
        state[0].zero_()
    chunked(ours, 4)
    with torch.no_grad():
        out, (h_n, c_n), trace = ours(x, state, return_gates=True)
    if views:  # one call over all steps; the trace is views into its workspace, `hidden` into the output
        assert kernel_calls == [11]
        assert len({storage(getattr(trace, name)) for name in NAMES[:5]}) == 1
        assert storage(trace.hidden) == storage(out)
    else:
        assert sorted(kernel_calls) == sorted([3, 3, 3, 2] * (layers * D)), "the kernel path, 3 steps per call"
    ref_out, (ref_h, ref_c), ref_trace = reference_lstm(ours, x, state)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_n, ref_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_n, ref_c, atol=1e-5, rtol=0)
    assert_trace_close(trace, ref_trace)
    assert trace.reconstruction_error < 1e-5
    assert trace.mask.all() and trace.num_directions == D
    torch.testing.assert_close(out, torch.nn.LSTM.forward(ours, x, state)[0], atol=1e-6, rtol=0)  # nn.LSTM's own


def test_a_long_sequence_is_copied_rather_than_viewed(kernel_calls, monkeypatch):
    """Past _VIEW_BYTES of workspace, one layer and direction also runs a few steps per call and copies."""
    ours = model(seed=3)
    x = torch.randn(4, 11, 3)
    chunked(ours, 4)
    monkeypatch.setattr(lstm_mod, "_VIEW_BYTES", 10 * 4 * 4 * 5 * 16)  # 10 steps' worth: 11 are too many
    with torch.no_grad():
        out, _, trace = ours(x, return_gates=True)
    assert kernel_calls == [3, 3, 3, 2] and storage(trace.input_gate) != storage(trace.cell)
    assert_trace_close(trace, reference_lstm(ours, x)[2])


@pytest.mark.parametrize("layers,bidirectional,proj", [(1, False, 0), (2, False, 0), (2, True, 0), (1, False, 2),
                                                       (2, True, 2)])
def test_kernel_gates_with_lengths_equal_the_recovery_path(kernel_calls, monkeypatch, layers, bidirectional, proj):
    """Padded input with lengths=: the dense kernel runs over the padding (after each sequence; the reverse
    direction reads each sequence reversed within its length), and everything past a length is masked out."""
    ours = model(num_layers=layers, bidirectional=bidirectional, seed=4, proj_size=proj)
    D = 2 if bidirectional else 1
    x = torch.randn(4, 10, 3)
    x[3, 1:] = float("nan")  # padding may hold anything
    lengths = torch.tensor([10, 4, 7, 1])
    state = (torch.randn(layers * D, 4, proj or 5), torch.randn(layers * D, 4, 5))
    chunked(ours, 4)
    with torch.no_grad():
        out, (h_n, c_n), trace = ours(x, state, lengths=lengths, return_gates=True)
    assert len(kernel_calls) == (1 if layers * D == 1 else 4 * layers * D)
    calls = len(kernel_calls)
    monkeypatch.setattr(lstm_mod, "_KERNEL_GATES", False)
    with torch.no_grad():
        ref_out, (ref_h, ref_c), ref_trace = ours(x, state, lengths=lengths, return_gates=True)
    assert len(kernel_calls) == calls, "the recovery path ran"
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
    assert len(kernel_calls) == 4 * 3
    ref_out, (ref_h, ref_c), ref_trace = reference_lstm(ours, x[None])
    assert out.shape == (7, 10) and h_n.shape == (4, 5)
    torch.testing.assert_close(out, ref_out[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(c_n, ref_c[:, 0], atol=1e-5, rtol=0)
    assert_trace_close(trace, ref_trace)


@pytest.mark.parametrize("layers,bidirectional,dropout,proj", [(3, True, 0.5, 0), (1, False, 0.0, 0),
                                                               (2, True, 0.5, 2), (1, False, 0.0, 3)])
def test_kernel_gates_train_mode_gradients_and_dropout(kernel_calls, layers, bidirectional, dropout, proj):
    """With a graph: the output's gradients are nn.LSTM's (the workspace autograd keeps for backward is read, never
    written), and dropout between layers draws nn.LSTM's masks. With projections the gradients reach W_hh, W_hr
    and h_0 through `_projected`'s products."""
    torch.manual_seed(8)
    ref = torch.nn.LSTM(3, 5, layers, batch_first=True, bidirectional=bidirectional, dropout=dropout, proj_size=proj)
    ours = GateLSTM(3, 5, layers, batch_first=True, bidirectional=bidirectional, dropout=dropout, proj_size=proj)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 3)
    D = 2 if bidirectional else 1
    h0 = torch.randn(layers * D, 2, proj or 5)
    c0 = torch.randn(layers * D, 2, 5)
    chunked(ours, 2)
    torch.manual_seed(1)
    h0_r = h0.clone().requires_grad_()
    out_r = ref(x, (h0_r, c0))[0]
    out_r.pow(2).sum().backward()
    torch.manual_seed(1)
    h0_o = h0.clone().requires_grad_()
    out, _, trace = ours(x, (h0_o, c0), return_gates=True)
    out.pow(2).sum().backward()
    torch.testing.assert_close(h0_o.grad, h0_r.grad, atol=1e-5, rtol=1e-5)
    assert sorted(kernel_calls) == sorted([3, 3, 2] * (layers * (2 if bidirectional else 1))), "copied out, 3 a call"
    torch.testing.assert_close(out, out_r, atol=1e-6, rtol=0)
    for p, p_r in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_r.grad, atol=1e-5, rtol=1e-5)
    assert trace.reconstruction_error < 1e-5 and not trace.cell.requires_grad
    if layers == 1:
        with torch.no_grad():
            _, _, ref_trace = reference_lstm(ours, x, (h0, c0))
        assert_trace_close(trace, ref_trace)


def _shift_cells(real):
    """_workspace_views with the cells one step off (another oneDNN's layout)."""
    def shifted(ws, n, B, I, H):
        views = real(ws, n, B, I, H)
        if views is None:
            return None
        gates, cells = views
        return gates, torch.roll(cells, 1, 0)
    return shifted


@pytest.mark.parametrize("wrong", ["gate rows", "cells"])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_layout_check_falls_back_to_recovery(kernel_calls, monkeypatch, wrong, layers, bidirectional):
    """Where the workspace does not hold the gates or the cells as expected, the traced forward recovers them by
    the matrix product instead, with the same results, and stops trying the workspace."""
    ours = model(num_layers=layers, bidirectional=bidirectional, seed=9)
    x = torch.randn(4, 9, 3)
    chunked(ours, 4)
    with torch.no_grad():
        expected = ours(x, return_gates=True)
    monkeypatch.setattr(lstm_mod, "_VERIFIED", set())
    if wrong == "gate rows":
        monkeypatch.setattr(lstm_mod, "_good_ld", lambda n: -(-n // 16) * 16 + 8)
    else:
        monkeypatch.setattr(lstm_mod, "_workspace_views", _shift_cells(lstm_mod._workspace_views))
    with torch.no_grad():
        out, _, trace = ours(x, return_gates=True)
    assert not lstm_mod._KERNEL_GATES
    torch.testing.assert_close(out, expected[0], atol=1e-6, rtol=0)
    assert_trace_close(trace, expected[2], atol=1e-6)
    assert trace.reconstruction_error < 1e-5


def test_layout_check_runs_once_per_configuration(kernel_calls, monkeypatch):
    """The layout is a function of the call's configuration: it is checked on the first call of each (and again
    after a call whose input left nothing finite to compare)."""
    checks = []
    real = lstm_mod._layout_holds

    def counted(*args):
        checks.append(args[2].shape[0])
        return real(*args)

    monkeypatch.setattr(lstm_mod, "_layout_holds", counted)
    ours = model(seed=11)
    with torch.no_grad():
        ours(torch.full((2, 6, 3), float("nan")), return_gates=True)  # nothing finite: not settled
        ours(torch.randn(2, 6, 3), return_gates=True)
        ours(torch.randn(2, 6, 3), return_gates=True)
        ours(torch.randn(2, 5, 3), return_gates=True)
        out, _, trace = ours(torch.randn(2, 5, 3), return_gates=True)
    assert checks == [6, 6, 5]
    assert lstm_mod._KERNEL_GATES and trace.reconstruction_error < 1e-5


def test_reconstruction_error_is_computed_when_read(kernel_calls):
    """The self-check runs on first read, over the trace as it is then: a corrupted cell shows; the number survives
    pickling and copying."""
    ours = model(seed=12)
    x = torch.randn(3, 8, 3)
    with torch.no_grad():
        _, _, trace = ours(x, return_gates=True)
        _, _, other = ours(x, return_gates=True)
    assert callable(trace._error)
    trace.cell[0, 1, 4] += 1.0
    assert trace.reconstruction_error > 0.05
    assert not callable(trace._error)
    assert other.reconstruction_error < 1e-5
    for again in (pickle.loads(pickle.dumps(other)), copy.deepcopy(other)):
        assert again.reconstruction_error == other.reconstruction_error
        torch.testing.assert_close(again.cell, other.cell)
    x[1, 2, 0] = float("nan")  # a NaN at a real step is never reported as a small error
    with torch.no_grad():
        assert ours(x, return_gates=True)[2].reconstruction_error != 0.0


def test_a_pickled_trace_holds_its_own_elements_not_the_workspace(kernel_calls):
    """The trace's tensors are views into the kernel's workspace (several times their size); pickling and
    torch.save store their elements only, and they come back equal."""
    import io

    ours = model(seed=13)
    with torch.no_grad():
        _, _, trace = ours(torch.randn(3, 8, 3), return_gates=True)
    own = sum(t.numel() * t.element_size() for _, t in trace.items()) + trace.mask.numel() * trace.mask.element_size()
    assert trace.cell.untyped_storage().nbytes() > trace.cell.numel() * 4  # a view into something bigger
    saved = io.BytesIO()
    torch.save(trace, saved)
    for blob in (pickle.dumps(trace), saved.getvalue()):
        assert len(blob) < own + 20_000
    again = torch.load(io.BytesIO(saved.getvalue()), weights_only=False)
    for name, tensor in trace.items():
        assert torch.equal(getattr(again, name), tensor), name


def test_an_empty_batch_has_no_trace_but_runs_as_nn_lstm():
    ours = model(seed=14)
    x = torch.randn(0, 8, 3)
    assert ours(x)[0].shape == (0, 8, ours.hidden_size)
    with pytest.raises(ValueError, match="the batch is empty"):
        ours(x, return_gates=True)


def test_copied_traces_reuse_buffers_only_when_dropped(kernel_calls, monkeypatch):
    """Where the trace is copied out, the next call reuses the last call's buffers, but only those nothing refers
    to any more: a trace, an output or a single view still held is never overwritten."""
    if lstm_mod._ALONE is None:
        pytest.skip("this torch cannot count storage references: nothing is pooled")
    ours = model(bidirectional=True, seed=13)
    x1, x2 = torch.randn(4, 6, 3), torch.randn(4, 6, 3)
    with torch.no_grad():
        expected = [ours(x, return_gates=True) for x in (x1, x2)]
        out, _, trace = ours(x1, return_gates=True)
        first = {name: storage(getattr(trace, name)) for name in NAMES}
        del out, trace
        out, _, trace = ours(x2, return_gates=True)  # the first call's buffers, reused
        assert {name: storage(getattr(trace, name)) for name in NAMES} == first
        assert_trace_close(trace, expected[1][2], atol=0)
        kept_cell, kept_out = trace.cell[1], out
        del trace
        out2, _, trace2 = ours(x1, return_gates=True)
        assert storage(trace2.cell) != storage(kept_cell) and storage(out2) != storage(kept_out)
        assert storage(trace2.input_gate) == first["input_gate"]  # the gates were free again
        torch.testing.assert_close(kept_cell, expected[1][2].cell[1], atol=0, rtol=0)
        torch.testing.assert_close(kept_out, expected[1][0], atol=0, rtol=0)
        assert_trace_close(trace2, expected[0][2], atol=0)


def test_empty_cache_releases_the_pooled_buffers(kernel_calls):
    """The pool keeps the last copied call's buffers after its trace is dropped; empty_cache() frees them."""
    if lstm_mod._ALONE is None:
        pytest.skip("this torch cannot count storage references: nothing is pooled")
    ours = model(bidirectional=True, seed=17)
    x = torch.randn(4, 6, 3)
    with torch.no_grad():
        expected = ours(x, return_gates=True)[2].cell.clone()  # the result is dropped: its buffers wait in the pool
        pooled = [weakref.ref(b) for b in lstm_mod._POOL.values()]
        assert len(pooled) == 3  # gates, cell, output
        lstm_mod.empty_cache()
        assert lstm_mod._POOL == {} and all(ref() is None for ref in pooled)
        trace = ours(x, return_gates=True)[2]
    torch.testing.assert_close(trace.cell, expected, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs", [{"proj_size": 2, "num_layers": 2}, {"bidirectional": True, "num_layers": 2}])
def test_concurrent_traced_calls_never_share_buffers(kernel_calls, kwargs):
    """Two threads tracing with one module, on the copying path (pooled buffers, and with projections a pooled
    scratch buffer): every output and trace equals the one computed alone. A call's buffers reach the pool only
    after its trace is built, so another thread never takes a buffer still being written."""
    ours = model(seed=15, **kwargs)
    chunked(ours, 8)
    inputs = [torch.randn(8, 40, 3, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    with torch.no_grad():
        alone = [ours(x, return_gates=True) for x in inputs]
    failures = []

    def worker(k):
        with torch.no_grad():
            for _ in range(40):
                out, _, trace = ours(inputs[k], return_gates=True)
                if not (torch.equal(out, alone[k][0]) and torch.equal(trace.cell, alone[k][2].cell)
                        and torch.equal(trace.input_gate, alone[k][2].input_gate)):
                    failures.append(k)
                del out, trace

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert len(kernel_calls) > 80 and failures == []


@pytest.mark.parametrize("bidirectional", [False, True])
def test_projections_give_a_zero_h0_its_gradient(kernel_calls, bidirectional):
    """A zero h_0 (or a zero slice of one) adds nothing to the first step, but its gradient is not zero: with a
    graph it still enters through the first step's input, and gets nn.LSTM's gradient."""
    torch.manual_seed(16)
    ref = torch.nn.LSTM(3, 5, 2, batch_first=True, bidirectional=bidirectional, proj_size=3)
    ours = GateLSTM(3, 5, 2, batch_first=True, bidirectional=bidirectional, proj_size=3)
    ours.load_state_dict(ref.state_dict())
    D = 2 if bidirectional else 1
    x, c0 = torch.randn(2, 6, 3), torch.randn(2 * D, 2, 5)
    for h0 in (torch.zeros(2 * D, 2, 3), torch.randn(2 * D, 2, 3).index_fill_(0, torch.tensor([0]), 0.0)):
        grads = []
        for module, kw in ((ref, {}), (ours, {"return_gates": True})):
            h = h0.clone().requires_grad_()
            module(x, (h, c0), **kw)[0].sum().backward()
            grads.append(h.grad)
        assert grads[1] is not None and grads[0][0].abs().max() > 1e-4
        torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    assert kernel_calls, "the kernel path ran"


@pytest.mark.parametrize("bidirectional", [False, True])
def test_kernel_gates_in_inference_mode_then_outside(kernel_calls, bidirectional):
    """Lightning validates under torch.inference_mode: its traces are inference tensors, and a later call outside
    inference mode must not try to write into them (or into their reused buffers)."""
    ours = model(bidirectional=bidirectional, seed=15)
    x = torch.randn(4, 6, 3)
    chunked(ours, 4)
    _, _, ref_trace = reference_lstm(ours, x)
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad):
        with mode():
            out, _, trace = ours(x, return_gates=True)
        assert trace.cell.is_inference() == (mode is torch.inference_mode)
        assert_trace_close(trace, ref_trace)
        del out, trace
    assert len(kernel_calls) == 4 * (4 if bidirectional else 1)  # 2 directions x 2 calls of 3 steps


@pytest.mark.parametrize("case", ["float64", "packed", "autocast", "lengths_with_graph"])
def test_recovery_path_where_the_kernel_does_not_apply(kernel_calls, case):
    ours = model(num_layers=2, seed=10, proj_size=2)
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


def _speed_benchmark(monkeypatch):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the benchmark sets it at import: keep it out of later tests
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lstm_speed.py"
    spec = importlib.util.spec_from_file_location("lstm_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kwargs", [{}, {"bidirectional": True}, {"proj_size": 2},
                                    {"num_layers": 2, "bidirectional": True, "bias": False}])
def test_the_speed_benchmarks_per_step_loop_is_the_reference(monkeypatch, kwargs):
    """benchmarks/lstm_speed.py times its own per-step loop (written as torch's LSTMCell steps): it must record
    what the reference cell records."""
    loop = _speed_benchmark(monkeypatch).per_step_loop
    ours = model(seed=14, **kwargs)
    x = torch.randn(4, 7, 3)
    with torch.no_grad():
        out, trace = loop(ours, x)
        ref_out, _, ref_trace = reference_lstm(ours, x)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    for name in NAMES:
        torch.testing.assert_close(trace[name], getattr(ref_trace, name), atol=1e-6, rtol=0, msg=name)
