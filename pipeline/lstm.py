"""GateLSTM: an LSTM that shows its gates, trained through the fused kernel.

The LSTM walk-through, one step (gate order i, f, g, o, as in `nn.LSTM`):

    input_gate   i_t = sigmoid(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)   how much to write
    forget_gate  f_t = sigmoid(W_if x_t + b_if + W_hf h_{t-1} + b_hf)   how much to keep
    candidate    g_t = tanh   (W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)   what to write
    output_gate  o_t = sigmoid(W_io x_t + b_io + W_ho h_{t-1} + b_ho)   how much to show
    cell         c_t = f_t * c_{t-1} + i_t * g_t
    hidden       h_t = o_t * tanh(c_t)            (with proj_size > 0: h_t = W_hr (o_t * tanh(c_t)))

`reference_step` is that walk-through, line by line. `GateLSTM` never runs it in training: it
is an `nn.LSTM` (a subclass: same constructor, parameters, checks and fused kernel) whose
forward can also return a `GateTrace`. When gates are asked for, on CPU in float32 (where
nn.LSTM runs oneDNN's LSTM kernel) each layer and direction runs through that kernel's training
form, `torch.mkldnn_rnn_layer(..., train=True)`, whose workspace holds every step's activated
gates and cell: with one layer and direction the trace is views into that workspace (one call
over the whole sequence, nothing copied), otherwise each call's rows are copied out
(`_kernel_direction`, a few steps per call). With projections (proj_size > 0, which nn.LSTM
runs as a per-step loop of ATen ops, oneDNN having none under torch) the kernel runs the
equivalent LSTM over the unprojected hidden with recurrent weights W_hh W_hr, and the output is
projected afterwards (`_projected`). Elsewhere it runs the layers one fused call at a
time, so each layer's input (after inter-layer dropout) is known, and recovers the gates exactly
from what the kernel returned: every h_t is known, so all pre-activations of a layer are one
batched matrix product over all steps, and the cell is a cheap elementwise recurrence. In both,
o_t * tanh(c_t) must give back h_t: a self-check (on the kernel's path it runs when
`reconstruction_error` is first read).

`VanillaRNN` is the same over `nn.RNN` (tanh or relu): its trace holds `hidden` only, and its
self-check is act(W_ih x_t + W_hh h_{t-1} + b) == h_t.

torch.compile: dynamo graph-breaks on every `nn.LSTM`/`nn.RNN` (subclasses included) and runs
it eagerly, so the fused kernel stays out of the graph as it does for nn.LSTM. With
`torch._dynamo.config.allow_rnn=True` dynamo traces into forward; the gate recovery then uses
the public `torch.addmm` instead of oneDNN's private linear op. `torch.jit.script` refuses with a
RuntimeError that says so (TorchScript cannot express `lengths=`, `return_gates=` or GateTrace).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import InitVar, dataclass, fields

import torch
import torch.nn.functional as F
from torch import _VF, Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

__all__ = ["GateLSTM", "GateTrace", "VanillaRNN", "empty_cache", "reference_step", "reference_lstm"]


@dataclass
class GateTrace:
    """Per-step activations, each (num_layers * num_directions, batch, time, size), no autograd.

    Layout of the first axis: as nn.LSTM's h_n, entry `layer * num_directions + direction`
    (direction 1 is the reverse one of a bidirectional module). Time runs in the input's order
    for both directions: the reverse direction's entry at step t is its state after reading
    x_T .. x_t. Gates and cell are hidden_size wide; `hidden` is h_t as the module returns it
    (proj_size wide with projections). Unbatched input still gets a batch axis of 1.

    Steps past a sequence's length are NaN (so nan-aware statistics skip them) and `mask`
    (batch, time) is True on real steps. A vanilla RNN's trace holds `hidden` only.

    dtype: the parameters' dtype. Under autocast the kernel's output is in the autocast dtype
    (e.g. bf16) while the trace is recomputed in the parameters' dtype (float32) from that
    output, so the self-check then measures bf16 rounding (~1e-2), not a bug.
    Traces are detached: they carry no gradient (they are for inspection; train on the output).

    reconstruction_error: max over real steps of |recomputed h_t - h_t from the kernel|
    (o_t * tanh(c_t), projected when proj_size > 0; act(pre-activation) for a vanilla RNN).
    It is NaN when any real step's reconstruction is NaN (a NaN or inf in the input, state or
    weights): a NaN is never reported as a small error. The constructor also takes a function
    that computes it: it then runs once, when the attribute is first read (GateLSTM's traced
    forward on oneDNN does so: a trace nobody checks costs no check), from the trace's tensors as
    they are then.

    Memory: the tensors may be views into a larger buffer (GateLSTM's traced forward with one
    layer and direction on CPU: the kernel's workspace), and with one layer `hidden` shares the
    output's memory, whatever the direction or length: an in-place change of the output (`out.relu_()`)
    changes `hidden` too, and `reconstruction_error` then reports the change. Clone what you keep for
    long, and before modifying the output or the trace in place. Pickling (and `torch.save`) stores each
    tensor's own elements, not the buffer behind it.
    """

    input_gate: Tensor | None
    forget_gate: Tensor | None
    candidate: Tensor | None
    output_gate: Tensor | None
    cell: Tensor | None
    hidden: Tensor
    mask: Tensor
    reconstruction_error: InitVar[float | Callable[[], float]] = 0.0
    num_directions: int = 1

    GATES = ("input_gate", "forget_gate", "candidate", "output_gate")

    def __post_init__(self, reconstruction_error):
        self._error = reconstruction_error

    def __getstate__(self):  # pickle and copy the number, not the function that computes it; and each tensor's own
        # elements: a view pickles its whole storage (the kernel's workspace, several times the trace)
        state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return {**state, "_error": self.reconstruction_error}

    def items(self):
        """(name, tensor) for every recorded activation."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) and f.name != "mask":
                yield f.name, value

    def layer(self, k: int) -> dict[str, Tensor]:
        """Entry k of the first axis (layer k // num_directions, direction k % num_directions)."""
        return {name: value[k] for name, value in self.items()}


def _read_error(trace: GateTrace) -> float:
    if callable(trace._error):
        trace._error = float(trace._error())
    return trace._error


GateTrace.reconstruction_error = property(_read_error, doc="see the class docstring")  # the InitVar's attribute


# --- the readable reference --------------------------------------------------------------------


def reference_step(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
                   b_hh: Tensor | None = None, w_hr: Tensor | None = None):
    """One LSTM step written as the walk-through reads. Returns (h, c, gates dict)."""
    pre = x @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        pre = pre + b_ih + b_hh
    i, f, g, o = pre.chunk(4, dim=-1)
    input_gate = torch.sigmoid(i)
    forget_gate = torch.sigmoid(f)
    candidate = torch.tanh(g)
    output_gate = torch.sigmoid(o)
    cell = forget_gate * c + input_gate * candidate  # forget some of the old, write some of the new
    hidden = output_gate * torch.tanh(cell)  # show a filtered view of the cell
    if w_hr is not None:
        hidden = hidden @ w_hr.T  # LSTM with projections (Sak et al. 2014)
    gates = dict(input_gate=input_gate, forget_gate=forget_gate, candidate=candidate, output_gate=output_gate)
    return hidden, cell, gates


def reference_lstm(lstm: GateLSTM | nn.LSTM, x: Tensor, state: tuple[Tensor, Tensor] | None = None):
    """The naive per-step loop over batch-first x (eval semantics, dense input, any bias/
    bidirectional/proj_size): (output, (h_n, c_n), GateTrace) in GateLSTM's layouts.

    For tests and teaching; it is what GateLSTM's fast path must equal.
    """
    B, T, _ = x.shape
    D = 2 if lstm.bidirectional else 1
    L, H = lstm.num_layers, lstm.hidden_size
    P = lstm.proj_size or H
    if state is None:
        state = (x.new_zeros(L * D, B, P), x.new_zeros(L * D, B, H))
    record = {name: [] for name in (*GateTrace.GATES, "cell", "hidden")}
    h_n, c_n, inp = [], [], x
    for k in range(L):
        outs = []
        for d in range(D):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            w = [getattr(lstm, f"{n}{sfx}") for n in ("weight_ih", "weight_hh")]
            b = [getattr(lstm, f"{n}{sfx}") for n in ("bias_ih", "bias_hh")] if lstm.bias else [None, None]
            w_hr = getattr(lstm, f"weight_hr{sfx}") if lstm.proj_size else None
            h, c = state[0][k * D + d], state[1][k * D + d]
            steps = {name: [] for name in record}
            xs = inp.unbind(1)  # unbind, not x[:, t]: indexing per step makes backward O(T^2)
            for x_t in (reversed(xs) if d else xs):
                h, c, gates = reference_step(x_t, h, c, *w, *b, w_hr)
                for name, value in (*gates.items(), ("cell", c), ("hidden", h)):
                    steps[name].append(value)
            for name in record:
                seq = steps[name][::-1] if d else steps[name]  # back to input order
                record[name].append(torch.stack(seq, dim=1))
            h_n.append(h)
            c_n.append(c)
            outs.append(record["hidden"][-1])
        inp = torch.cat(outs, dim=-1)
    trace = GateTrace(**{n: torch.stack(v) for n, v in record.items()}, mask=x.new_ones(B, T, dtype=torch.bool),
                      num_directions=D)
    return inp, (torch.stack(h_n), torch.stack(c_n)), trace


# --- gate recovery: the fast path ------------------------------------------------------------------


def _onednn_linear_available() -> bool:
    try:
        a = torch.ones(2, 3)
        return bool(torch.ops.mkldnn._linear_pointwise(a, torch.ones(4, 3), torch.zeros(4), "none", [], "")[0, 0] == 3)
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _onednn_linear_available()


def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """x @ w.T + b. On CPU in float32, oneDNN's matmul (the library behind the fused LSTM kernel)
    ran these tall-skinny products about 2x faster than the default BLAS path on our 2-core machine.
    Under torch.compile the public addmm (inductor cannot lower the private oneDNN op)."""
    if (_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.compiler.is_compiling()):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return torch.addmm(b, x, w.T)


def _preactivations(x: Tensor, h: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor | None,
                    row_scale: Tensor | None = None, order: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Every step's W_ih x_t + W_hh h_{t-1} + b as one product. x (T, B, I), h (T, B, P) time-major,
    h0 (B, P). Returns (pre-activations (T, B, G), h as a (T, B, P) view of the buffer used), in
    processing order: step t reads x[order[t, b], b] when order (T, B) is given (a reverse direction).

    Rows t of one buffer hold [x_t, h_{t-1}]; row T holds h_{T-1}, so the returned hidden is a view
    and never copied again. row_scale (G,) scales weight rows and bias (the candidate trick)."""
    T, B, I = x.shape
    P = h.shape[-1]
    xh = torch.empty(T + 1, B, I + P, dtype=w_ih.dtype, device=w_ih.device)
    if order is None:
        xh[:T, :, :I] = x
        xh[1:, :, I:] = h
    else:  # reorder straight into the buffer: no reversed copies of x and h
        _gather_into(xh[:T, :, :I], x.to(xh.dtype), order)
        _gather_into(xh[1:, :, I:], h.to(xh.dtype), order)
    xh[T, :, :I] = 0
    xh[0, :, I:] = h0
    w = torch.cat([w_ih, w_hh], 1)
    if b is None:
        b = w.new_zeros(w.shape[0])
    if row_scale is not None:
        w, b = w * row_scale[:, None], b * row_scale
    pre = _linear(xh[:T].view(T * B, I + P), w, b).view(T, B, -1)
    return pre, xh[1:, :, I:]


def _worst(worst: float, err: Tensor | float) -> float:
    """Running max of |error| that keeps NaN (Python's max(0.0, nan) is 0.0: the old self-check's lie)."""
    if isinstance(err, Tensor):
        if not err.numel():
            return worst
        err = float(err.max())  # torch's max propagates NaN
    if math.isnan(worst):
        return worst
    return err if math.isnan(err) or err > worst else worst


def _lstm_gates(x, h, h0, c0, w_ih, w_hh, b, w_hr, real, order=None):
    """Recover one direction of one layer: gates (T, B, 4, H), cell (T, B, H), hidden view, error.

    real (T, B) marks real steps; all tensors time-major; results in processing order (see
    _preactivations for `order`)."""
    T, B, _ = x.shape
    H = w_hh.shape[1] if w_hr is None else w_hr.shape[1]
    # the candidate's rows are doubled so one sigmoid serves all four: tanh(z) = 2 sigmoid(2z) - 1, and a
    # contiguous sigmoid is several times faster than tanh on CPU
    scale = torch.ones(4, H, dtype=w_ih.dtype, device=w_ih.device)
    scale[2] = 2.0
    g, hidden = _preactivations(x, h, h0, w_ih, w_hh, b, scale.view(-1), order)
    g = g.view(T, B, 4, H).sigmoid_()  # input, forget, output gates (and 2 sigmoid(2z) for the candidate)
    g[:, :, 2].mul_(2).sub_(1)  # candidate: tanh
    i, f, candidate, o = g.unbind(2)
    cell = torch.mul(i, candidate)  # i_t * g_t for every step, then in place:
    c_prev = c0.to(cell.dtype)
    for t in range(T):  # c_t = f_t * c_{t-1} + i_t * g_t
        c_prev = cell[t].addcmul_(f[t], c_prev)
    # self-check: o_t * tanh(c_t) (projected) must give back the kernel's h_t (in blocks of steps, so the
    # temporaries stay small and in cache); padded steps do not count
    worst = 0.0
    for t0 in range(0, T, 64):
        span = slice(t0, t0 + 64)
        shown = cell[span].mul(2).sigmoid_().mul_(2).sub_(1).mul_(o[span])
        if w_hr is not None:
            shown = shown @ w_hr.T
        worst = _worst(worst, shown.sub_(hidden[span]).abs_()[real[span]])
    return g, cell, hidden, worst


def _rnn_hidden_check(x, h, h0, w_ih, w_hh, b, relu: bool, real, order=None) -> tuple[Tensor, float]:
    """A vanilla RNN layer direction: (hidden view, max |act(W_ih x_t + W_hh h_{t-1} + b) - h_t|)."""
    pre, hidden = _preactivations(x, h, h0, w_ih, w_hh, b, order=order)
    act = pre.relu_() if relu else pre.tanh_()
    return hidden, _worst(0.0, act.sub_(hidden).abs_()[real])


def _reverse_index(lens: Tensor, T: int) -> Tensor:
    """(T, B) time indices that reverse each sequence within its own length (padding stays put)."""
    t = torch.arange(T)[:, None]
    lens = lens[None, :]
    return torch.where(t < lens, lens - 1 - t, t)


def _gather_into(dest: Tensor, v: Tensor, idx: Tensor) -> None:
    """dest[t, b] = v[idx[t, b], b] along time, straight into dest (no temporary), except under torch.compile,
    which cannot trace gather's out= with symbolic sizes: there by assignment."""
    if torch.compiler.is_compiling():
        dest.copy_(torch.gather(v, 0, _time_index(idx, v)))
    else:
        torch.gather(v, 0, _time_index(idx, v), out=dest)


def _time_index(idx: Tensor, v: Tensor) -> Tensor:
    """(T, B) time indices expanded to gather along time from v (T, B, ...)."""
    return idx.to(v.device).view(*idx.shape, *([1] * (v.dim() - 2))).expand_as(v)



# --- the kernel's own gates: oneDNN's training workspace ------------------------------------------------


def _kernel_gates_available() -> bool:
    return hasattr(torch, "mkldnn_rnn_layer") and torch.backends.mkldnn.is_available()


_KERNEL_GATES = _kernel_gates_available()  # set False for the process if a workspace ever fails the layout check
_VERIFIED: set[tuple] = set()  # kernel configurations whose workspace has passed the layout check
_TRACE_VIEWS = True  # one layer and direction without a graph: the trace is views into the workspace (tests turn
# it off to run that case the copying way too) when that workspace is at most _VIEW_BYTES (by the estimate below)
_VIEW_BYTES = 128 << 20  # a larger one is fresh memory whose page faults cost more, and vary more, than copying
# into buffers (pooled, or fresh but a third smaller). Measured at batch 64, hidden 256, 1 thread, against nn.LSTM's
# forward: views 1.18x and copies 1.29x at T = 100; at T = 1000 views 1.8x (1.2-2.1x), copies 1.3x
_CHUNK_BYTES = 16 << 20  # workspace bytes per kernel call where the trace is copied out (about B * 16 * 4H per
# step): few enough calls that the per-call cost (~0.2 ms) stays small, and under glibc's 32 MiB ceiling for reusing
# freed heap blocks instead of mapping fresh pages (which torch's THP_MEM_ALLOC_ENABLE=1 allocations get anyway:
# then each call faults its pages)


_HEAP_READY_BYTES = 0  # the largest workspace _reuse_heap has prepared for


def _reuse_heap(nbytes: int) -> None:
    """Let workspaces of nbytes be reused from the heap rather than mapped afresh on every kernel call.

    glibc maps blocks above its mmap threshold afresh (every page then faults in zeroed, at each call) and raises
    that threshold to the size of such a block when one is freed. torch's page-aligned allocations (those of
    THP_MEM_ALLOC_ENABLE=1) free a block a few bytes smaller than the same request, so equal workspaces never
    reach the heap. Allocating and freeing one untouched block 1 MiB larger raises the threshold past them (as
    glibc itself would for unaligned blocks); glibc's ceiling for that is 32 MiB, above our chunks."""
    global _HEAP_READY_BYTES
    if nbytes > _HEAP_READY_BYTES:
        torch.empty(nbytes + (1 << 20), dtype=torch.uint8)  # freed at once: never touched, no page faults
        _HEAP_READY_BYTES = nbytes


def _storage_use_count(t: Tensor) -> int:
    storage = t.untyped_storage()  # held while counting
    return torch._C._storage_Use_Count(storage._cdata)


def _baseline_use_count() -> int | None:
    """How many references a tensor's memory has when nothing else refers to it (torch's own: the tensor and its
    storage object), or None where torch cannot tell (then nothing is pooled)."""
    try:
        t = torch.empty(4)
        alone = _storage_use_count(t)
        view = t[1:]
        shared = _storage_use_count(t)
        del view
        return alone if shared == alone + 1 and _storage_use_count(t) == alone else None
    except (AttributeError, RuntimeError, TypeError):
        return None


_POOL: dict[str, Tensor] = {}  # the buffers of the last traced call that copied its trace, by role, for reuse
_POOL_LOCK = threading.Lock()  # taking from and giving back to the pool (traced calls may run in several threads)
_POOL_BYTES = 1 << 30  # pool no more than this; the pool keeps it after the trace is dropped (`empty_cache`).
# 1 GiB holds a bidirectional trace at T = 1000 (batch 64, hidden 256: 0.8 GB), whose fresh buffers cost 0.25x
# nn.LSTM's forward at 1 thread (CPU time 1017 against 1275 ms); 256 MiB held no T = 1000 trace at all
_ALONE = _baseline_use_count()


def _unshared(buffer: Tensor) -> bool:
    """True when nothing but the pool's own tensor refers to buffer's memory: no trace, output or view of it."""
    return _ALONE is not None and _storage_use_count(buffer) == _ALONE


def _buffers(like: Tensor, **shapes: tuple[int, ...]) -> dict[str, Tensor]:
    """Empty float32 buffers of the given shapes for a traced call: those of the last call, role by role, where
    nothing refers to them any more (the caller dropped that trace and output), else fresh ones. Fresh memory
    costs its page faults at first touch (torch maps large tensors afresh: about 0.1 ms per MB on our machine,
    as much as the copy into it), so a loop over batches that drops each trace reuses one set of buffers.
    The buffers leave the pool here (a concurrent call finds it empty and makes its own) and come back with
    `_release` once the call has built its trace: a buffer the call still writes is never in the pool.
    Only the last call's buffers are pooled, and only up to _POOL_BYTES in all."""
    global _POOL
    with _POOL_LOCK:
        old, _POOL = _POOL, {}
    inference = torch.is_inference_mode_enabled()  # an inference tensor cannot be written outside inference mode
    made = {}
    for role, shape in shapes.items():
        buffer = old.get(role)
        fits = buffer is not None and buffer.shape == shape and buffer.is_inference() == inference
        made[role] = buffer if fits and _unshared(buffer) else like.new_empty(shape)
    return made


def empty_cache() -> None:
    """Release the buffers that GateLSTM's traced forward keeps for its next call, as `torch.cuda.empty_cache()`
    does for CUDA's cache: those of the last call whose trace was copied out of the kernel's workspaces (two or
    more layers or directions, or a long sequence), up to 1 GiB. Buffers a trace still uses stay with that trace.
    Call it after a long traced evaluation when the process goes on to other work."""
    global _POOL
    with _POOL_LOCK:
        _POOL = {}


def _release(made: dict[str, Tensor]) -> None:
    """Give a finished traced call's buffers to the pool, in place of what it holds (see `_buffers`)."""
    global _POOL
    if sum(b.numel() for b in made.values()) * 4 <= _POOL_BYTES:
        with _POOL_LOCK:
            _POOL = dict(made)


def _good_ld(n: int) -> int:
    """oneDNN's leading dimension for rows of n floats in an RNN workspace (rnn_utils get_good_ld): rounded up to
    64 bytes, plus 64 bytes when that is a multiple of 256 floats (against 4K aliasing)."""
    ld = -(-n // 16) * 16
    return ld + 16 if ld % 256 == 0 else ld


def _workspace_views(ws: Tensor | None, n: int, B: int, I: int, H: int) -> tuple[Tensor, Tensor] | None:
    """(gates (n, B, 4, H), cells (n, B, H)): views into the workspace of one training-kernel call over n steps of
    batch B, input I, hidden H, in processing order; None when the workspace is too small to hold them.

    oneDNN lays that workspace out in regions that each start on a 4096-byte page (rnn_utils set_offsets, read
    and checked on oneDNN 3.12): the activated gates (n, B, get_good_ld(4H)) from offset 0, h_t before any
    projection (n, B, get_good_ld(H)), the states (2, n + 1, B, get_good_ld(max(I, H))), then the cells
    (2, n + 1, B, H), whose slot [1, t + 1] holds step t's cell, except for the last step: the kernel writes that
    one to its c_n output only, so the last row of the cells view is left for the caller to fill."""
    def pages(floats: int) -> int:
        return -(-floats // 1024) * 1024

    ld = _good_ld(4 * H)
    start = (pages(n * B * ld) + pages(n * B * _good_ld(H)) + pages(2 * (n + 1) * B * _good_ld(max(I, H)))
             + (n + 2) * B * H)
    if ws is None or ws.numel() < 4 * (start + n * B * H):
        return None
    f = ws.view(torch.float32)
    return f[: n * B * ld].view(n, B, ld)[:, :, : 4 * H].view(n, B, 4, H), f[start : start + n * B * H].view(n, B, H)


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _activate(pre: Tensor) -> Tensor:
    """(..., 4H) pre-activations -> gates i, f, g, o (sigmoid, sigmoid, tanh, sigmoid)."""
    i, f, g, o = pre.chunk(4, dim=-1)
    return torch.cat([i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()], -1)


def _kernel_call(x: Tensor, h: Tensor, c: Tensor, w: list[Tensor], has_bias: bool, reverse: bool):
    """One call of oneDNN's LSTM training kernel (nn.LSTM's CPU float32 kernel) over x (n, B, I) contiguous, from
    state h, c (B, H), with w [w_ih, w_hh, b_ih, b_hh]: (output (n, B, H) in input order, h_n, c_n, gates
    (n, B, 4, H), cells (n, B, H)). Gates and cells are views into the kernel's workspace, in processing order (for
    reverse, row 0 is step n - 1), and the cells' last row is not written there (it is c_n).

    Returns None when the workspace does not hold them where `_workspace_views` expects. That is checked
    (`_layout_holds`) on the first call of each configuration (sizes, bias, direction, threads) until a check has
    compared finite numbers and passed: the layout is a function of the configuration."""
    n, B, I = x.shape
    H = h.shape[-1]
    out, h_n, c_n, ws = torch.mkldnn_rnn_layer(x, *w, h, c, reverse, [], 2, H, 1, has_bias, False, False, True)
    views = _workspace_views(ws, n, B, I, H)
    if views is None:
        return None
    key = (n, B, I, H, has_bias, reverse, torch.get_num_threads())
    if key not in _VERIFIED:
        with torch.no_grad():
            holds = _layout_holds(*views, x, h, c, out, w, reverse)
        if holds is False:
            return None
        if holds:
            _VERIFIED.add(key)
    return out, h_n, c_n, *views


def _layout_holds(gates: Tensor, cells: Tensor, x: Tensor, h0: Tensor, c0: Tensor, out: Tensor, w: list[Tensor],
                  reverse: bool) -> bool | None:
    """The workspace layout check on a call's first two processed steps (every batch row): the gates read there
    must be the activations recomputed from x, h_0 and the kernel's first h (to 1e-4), and the cells read there
    f_t * c_{t-1} + i_t * g_t (to 1e-4 relative). NaN against NaN is a match (padding may hold anything), NaN
    against a number is not. None when nothing finite was compared (the check then runs again next time)."""
    n = x.shape[0]
    steps = [n - 1, n - 2] if reverse else [0, 1]  # input positions of processing rows 0 and 1
    h_prev, c_prev, compared = h0.detach(), c0.detach(), False

    def differ(got, want, tol):
        return bool(((got - want).abs() > tol).any() or (got.isnan() != want.isnan()).any())

    for k, t in enumerate(steps):
        if not 0 <= t < n:
            break
        want = _activate(x[t] @ w[0].T + h_prev @ w[1].T + w[2] + w[3]).view_as(gates[k])
        if differ(gates[k], want, 1e-4):
            return False
        compared = compared or bool(want.isfinite().any())
        if k < n - 1:  # the last row is c_n's, not the workspace's
            i, f, g, _ = gates[k].unbind(1)
            want_c = f * c_prev + i * g
            if differ(cells[k], want_c, 1e-4 * (1 + want_c.abs())):
                return False
            c_prev = cells[k]
        h_prev = out[t].detach()
    return True if compared else None


def _kernel_direction(x: Tensor, h0: Tensor, c0: Tensor, w: list[Tensor], has_bias: bool, reverse: bool,
                      chunk: int, gates: Tensor, cell: Tensor, hidden: Tensor | None, rev: Tensor | None = None,
                      output: Tensor | None = None):
    """One direction of one layer through the training kernel, `chunk` steps per call (the state carried across
    calls, so each workspace stays small), every call's gates and cells copied out into gates (T, B, 4, H) and
    cell (T, B, H), its output into hidden (T, B, H) unless that is None, all in input order.

    x (T, B, I) contiguous, time-major; h0, c0 (B, H); w as `_kernel_call`. rev (T, B): for a reverse direction
    over sequences of different lengths, x is already reversed within each length (x[p, b] = input[rev[p, b], b])
    and runs forwards; rows go back by rev. output: a (T, B, H) view to write the output into (without autograd:
    it saves a concatenation). Returns (output (T, B, H) in input order (with rev: processing order), (h_n, c_n)),
    or None when a workspace fails the layout check (the caller then recovers the gates by one matrix product)."""
    T = x.shape[0]
    starts = range(0, T, chunk)
    kernel_reverse = reverse and rev is None
    outs, h, c = [], h0, c0
    for t0 in (reversed(starts) if kernel_reverse else starts):
        t1 = min(t0 + chunk, T)
        res = _kernel_call(x[t0:t1], h, c, w, has_bias, kernel_reverse)
        if res is None:
            return None
        out, h, c, g, cl = res
        if output is None:
            outs.append(out)
        else:
            output[t0:t1].copy_(out)
        _reuse_heap(cl.untyped_storage().nbytes())
        with torch.no_grad():
            c_last = c.detach()[None]
            if rev is not None:  # processing row p of sequence b is its step rev[p, b]
                at = rev[t0:t1]
                gates.scatter_(0, _time_index(at, g), g)
                cell.scatter_(0, _time_index(at[:-1], cl[:-1]), cl[:-1])
                cell.scatter_(0, _time_index(at[-1:], c_last), c_last)
                if hidden is not None:
                    hidden.scatter_(0, _time_index(at, out), out.detach())
                continue
            if hidden is not None:
                hidden[t0:t1].copy_(out)
            if kernel_reverse:  # processing row s is step t1 - 1 - s (index_select: as fast as a copy)
                back = torch.arange(t1 - t0 - 1, -1, -1)
                torch.index_select(g, 0, back, out=gates[t0:t1])
                torch.index_select(cl, 0, back[1:], out=cell[t0 + 1 : t1])
                cell[t0].copy_(c_last[0])
            else:
                gates[t0:t1].copy_(g)
                cell[t0 : t1 - 1].copy_(cl[:-1])
                cell[t1 - 1].copy_(c_last[0])
    if output is not None:
        return output, (h, c)
    if kernel_reverse:
        outs.reverse()
    return torch.cat(outs) if len(outs) > 1 else outs[0], (h, c)


def _projected(x: Tensor, w: list[Tensor], h0: Tensor, w_hr: Tensor, first: int) -> tuple[Tensor, list[Tensor], Tensor]:
    """One direction of an LSTM with projections, h_t = W_hr m_t with m_t = o_t * tanh(c_t), as the kernel's LSTM
    without them (oneDNN runs no projections under torch): W_hh h_{t-1} = (W_hh W_hr) m_{t-1}, so the kernel runs
    with recurrent weights W_hh W_hr (4H, H) over the state m (H wide), its output is every m_t, and the
    projection is one product over all steps afterwards. The pre-activations differ from nn.LSTM's by float
    rounding only (the products are associated the other way).

    h_0 is given projected (B, P) and has no m_0: it enters through the input instead. x_t' = [x_t, h_0] at the
    first processed step (row `first`: 0, or T - 1 for the kernel's reverse direction) and [x_t, 0] elsewhere,
    with W_ih' = [W_ih, W_hh], and m_0 = 0. Skipped when h_0 is zero and needs no gradient (nothing to add). The
    wider input costs its product over every step: at (64, 100, 64, 256) with proj_size 64, 1 thread, about 0.2x
    nn.LSTM's forward.

    x (T, B, I); w [w_ih, w_hh, b_ih, b_hh] with w_hh (4H, P); h0 (B, P); w_hr (P, H). Returns (x', w', m_0)
    for `_kernel_call`; differentiable (a graph reaches W_hh, W_hr and h_0 through them)."""
    H = w_hr.shape[1]
    w_ih, w_hh, *biases = w
    m0 = h0.new_zeros(h0.shape[0], H)
    if not h0.requires_grad and not bool(h0.ne(0).any()):  # (a zero h_0 that wants its gradient still enters)
        return x, [w_ih, (w_hh @ w_hr).contiguous(), *biases], m0
    rows = [h0[None], h0.new_zeros(x.shape[0] - 1, *h0.shape)]
    extra = torch.cat(rows if first == 0 else rows[::-1])
    return (torch.cat([x, extra.to(x.dtype)], -1), [torch.cat([w_ih, w_hh], 1), (w_hh @ w_hr).contiguous(),
                                                     *biases], m0)


def _trace_error(output_gate: Tensor, cell: Tensor, hidden: Tensor, mask: Tensor,
                 projections: Tensor | None = None) -> float:
    """The self-check of a finished trace: max over real steps of |o_t * tanh(c_t) - h_t|, with h_t the kernel's
    output; output_gate, cell (E, B, T, H), hidden (E, B, T, P), mask (B, T) True on real steps, projections
    (E, P, H) W_hr per entry when proj_size > 0 (then the left side is projected). In blocks of steps, so the
    temporaries stay small."""
    worst = 0.0
    T = mask.shape[1]
    for e in range(cell.shape[0]):
        for t0 in range(0, T, 16):
            span = slice(t0, t0 + 16)
            shown = cell[e, :, span].mul(2).sigmoid_().mul_(2).sub_(1).mul_(output_gate[e, :, span])  # tanh(c) o
            if projections is not None:
                shown = shown @ projections[e].T
            err = shown.sub_(hidden[e, :, span]).abs_()
            real = mask[:, span]
            worst = _worst(worst, err if bool(real.all()) else err[real])
    return worst


# --- the modules ---------------------------------------------------------------------------------


class _Traced:
    """What GateLSTM and VanillaRNN add to nn.LSTM / nn.RNN: input checks before any kernel call,
    `lengths=`, and the layer-by-layer traced pass. Mixed in before the torch class."""

    def _state_tuple(self, hx):
        raise NotImplementedError

    def _direction_weights(self, k: int, d: int) -> list[Tensor]:
        sfx = f"_l{k}" + ("_reverse" if d else "")
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        names += ["weight_hr"] if getattr(self, "proj_size", 0) else []
        return [getattr(self, n + sfx) for n in names]

    def inter_layer_dropout(self, out: Tensor, batch_sizes: Tensor | None, sorted_indices: Tensor | None) -> Tensor:
        """nn.LSTM's dropout between layers, on one layer's output: dense in the input's layout, or a
        PackedSequence's data (time-major rows, the batch in `sorted_indices` order). A hook: a subclass may
        draw other masks (pipeline.models.base draws them per sample); then training with dropout between
        layers runs layer by layer, as the traced pass does, so the hook sees every layer's output."""
        return F.dropout(out, self.dropout, training=True)

    def _custom_dropout(self) -> bool:
        """True when a subclass draws its own inter-layer masks and they would be drawn in this forward."""
        return (self.dropout > 0 and self.training and self.num_layers > 1
                and type(self).inter_layer_dropout is not _Traced.inter_layer_dropout)

    def _pack_lengths(self, input, lengths):
        """Pack a padded batch by its true lengths, with clear errors for bad lengths."""
        if isinstance(input, PackedSequence):
            raise ValueError("lengths= is for a padded tensor; a PackedSequence already carries its lengths")
        if not isinstance(input, Tensor) or input.dim() != 3:
            raise ValueError(f"lengths= needs a batched 3-D input, got "
                             f"{input.dim() if isinstance(input, Tensor) else type(input).__name__}-D")
        B, T = (input.shape[0], input.shape[1]) if self.batch_first else (input.shape[1], input.shape[0])
        lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.shape[0] != B or lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"lengths must be a 1-D integer tensor of {B} lengths (one per sequence), "
                             f"got {lengths.dtype} of shape {tuple(lengths.shape)}")
        lengths = lengths.cpu()
        if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"lengths must be in [1, {T}] (the padded length), got min {int(lengths.min())} "
                             f"and max {int(lengths.max())}")
        return pack_padded_sequence(input, lengths, batch_first=self.batch_first, enforce_sorted=False)

    def _prepare(self, input, hx, need_state: bool = True):
        """nn.LSTM/nn.RNN forward's preamble with its checks, for every input kind (nn.LSTM skips them for
        packed input). Returns (data, batch_sizes, sorted state, caller-order 3-D state, is_batched); the
        states are None when none was given and need_state is False (then only the input is checked)."""
        D = 2 if self.bidirectional else 1
        P = getattr(self, "proj_size", 0) or self.hidden_size
        hx = self._state_tuple(hx)
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, _ = input
            is_batched = True
            if data.dim() != 2:
                raise RuntimeError(f"input must have 2 dimensions, got {data.dim()}")
            B = int(batch_sizes[0])
        else:
            data, batch_sizes, sorted_indices = input, None, None
            if input.dim() not in (2, 3):
                raise ValueError(f"{self._kind}: Expected input to be 2D or 3D, got {input.dim()}D "
                                 + ("instead" if self._kind == "LSTM" else "tensor instead"))
            is_batched = input.dim() == 3
            if not is_batched:
                data = input.unsqueeze(0 if self.batch_first else 1)
            B = data.size(0) if self.batch_first else data.size(1)
            if hx is not None:
                want = 3 if is_batched else 2
                if any(h.dim() != want for h in hx):
                    dims = ", ".join(f"{h.dim()}-D" for h in hx)
                    kind = "batched 3-D" if is_batched else "unbatched 2-D"
                    if self._kind == "LSTM":
                        raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got ({dims}) "
                                           "tensors")
                    raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {dims} tensor")
                if not is_batched:
                    hx = tuple(h.unsqueeze(1) for h in hx)
        if hx is None and not need_state:
            self.check_input(data, batch_sizes)  # zero states always fit: the untraced path lets torch make them
            return data, batch_sizes, None, None, is_batched
        if hx is None:
            sizes = [P, self.hidden_size] if self._kind == "LSTM" else [self.hidden_size]
            hx = tuple(torch.zeros(self.num_layers * D, B, s, dtype=data.dtype, device=data.device) for s in sizes)
        self._check_forward(data, hx, batch_sizes)
        sorted_hx = hx if sorted_indices is None else tuple(h.index_select(1, sorted_indices) for h in hx)
        return data, batch_sizes, sorted_hx, hx, is_batched

    def _check_forward(self, data, hx, batch_sizes):
        # nn.LSTM's own checks (shapes, input dtype). A state's dtype or device is left to the kernel, which
        # refuses those with its own RuntimeError, as under nn.LSTM
        self.check_forward_args(data, hx if self._kind == "LSTM" else hx[0], batch_sizes)

    def _fused(self, inp, batch_sizes, hx, weights):
        raise NotImplementedError

    def _kernel_pass(self, input, hx, lengths, is_batched):
        """The traced forward straight from the kernel's own gates, where the kernel keeps them; None otherwise."""
        return None

    def _layer_by_layer(self, data, batch_sizes, hx, sorted_indices=None):
        """One fused call per layer (both directions in one call): (output data, final state, layer ios)."""
        D = 2 if self.bidirectional else 1
        finals, layers, inp = [], [], data
        for k in range(self.num_layers):
            weights = [w for d in range(D) for w in self._direction_weights(k, d)]
            out, state = self._fused(inp, batch_sizes, tuple(h[k * D : (k + 1) * D] for h in hx), weights)
            finals.append(state)
            layers.append((inp, out))
            last = k == self.num_layers - 1
            inp = out if last or not (self.dropout > 0 and self.training) else \
                self.inter_layer_dropout(out, batch_sizes, sorted_indices)
        return out, tuple(torch.cat(parts) for parts in zip(*finals)), layers

    def _run(self, input, hx, lengths, return_gates):
        """Checks, then either the plain torch forward or the traced layer-by-layer pass."""
        if return_gates and isinstance(input, Tensor) and input.dim() == 3 and \
                input.shape[0 if self.batch_first else 1] == 0:
            raise ValueError("return_gates=True needs at least one sequence: the batch is empty")
        x = input if lengths is None else self._pack_lengths(input, lengths)
        layered = return_gates or self._custom_dropout()
        data, batch_sizes, sorted_hx, hx3, is_batched = self._prepare(x, hx, need_state=layered)
        if return_gates:
            fast = self._kernel_pass(input, hx3, lengths, is_batched)
            if fast is not None:
                return fast
        trace = None
        if not layered:
            output, state = super().forward(x, hx)  # exactly nn.LSTM / nn.RNN, after our checks
            state = self._state_tuple(state)
        else:
            sorted_indices = x.sorted_indices if batch_sizes is not None else None
            out, state, layers = self._layer_by_layer(data, batch_sizes, sorted_hx, sorted_indices)
            if batch_sizes is not None:
                output = PackedSequence(out, batch_sizes, x.sorted_indices, x.unsorted_indices)
                if x.unsorted_indices is not None:
                    state = tuple(h.index_select(1, x.unsorted_indices) for h in state)
            elif not is_batched:
                output = out.squeeze(0 if self.batch_first else 1)
                state = tuple(h.squeeze(1) for h in state)
            else:
                output = out
        padded_length = None if lengths is None else input.shape[1 if self.batch_first else 0]
        if return_gates:
            trace = self._trace(x, layers, hx3, padded_length)
        if lengths is not None:
            output = pad_packed_sequence(output, batch_first=self.batch_first, total_length=padded_length)[0]
        return output, state, trace

    @torch.no_grad()
    def _trace(self, x, layers, hx, total: int | None) -> GateTrace:
        """Recover every layer and direction from the fused pass (caller's batch order, batch-first).
        total: the padded length when packing came from lengths= (the trace keeps that length)."""
        packed = x if isinstance(x, PackedSequence) else None

        def time_major(seq):
            if packed is not None:
                return pad_packed_sequence(PackedSequence(seq, packed.batch_sizes, packed.sorted_indices,
                                                          packed.unsorted_indices), total_length=total)[0]
            seq = seq if seq.dim() == 3 else seq.unsqueeze(0 if self.batch_first else 1)
            return seq.transpose(0, 1) if self.batch_first else seq

        first = time_major(layers[0][0])
        T, B = first.shape[:2]
        if packed is not None:
            lens = pad_packed_sequence(packed)[1]
        else:
            lens = torch.full((B,), T)
        mask = torch.arange(T)[None, :] < lens[:, None]  # (B, T), True on real steps
        real = mask.T.to(first.device)
        D = 2 if self.bidirectional else 1
        P = hx[0].shape[-1]
        rev = _reverse_index(lens, T) if D == 2 else None
        worst, entries = 0.0, []
        with torch.autocast(first.device.type, enabled=False):
            for k, (inp, out) in enumerate(layers):
                inp, out = time_major(inp), time_major(out)
                for d in range(D):
                    w = self._direction_weights(k, d)
                    h = out[..., d * P : (d + 1) * P]
                    # the reverse direction runs in its own processing order (each sequence reversed)
                    entry, err = self._recover(inp, h, [s[k * D + d] for s in hx], w, real, rev if d else None)
                    worst = _worst(worst, err)
                    entries.append(entry)
        # (T, B, ...) per entry -> (L * D, B, T, ...): views when there is one entry, else one copy per name,
        # which also puts the reverse direction's entries back in input order
        if len(entries) == 1:
            stacked = [v[None] for v in entries[0]]
        else:
            stacked = []
            for parts in zip(*entries):
                buf = parts[0].new_empty(len(parts), *parts[0].shape)
                for e, v in enumerate(parts):
                    if e % D:
                        _gather_into(buf[e], v, rev)
                    else:
                        buf[e].copy_(v)
                stacked.append(buf)
        views = [v.transpose(1, 2) for v in stacked]
        if self._kind == "LSTM":
            gates, cell, hidden = views
            views = [gates[..., j, :] for j in range(4)] + [cell, hidden]
        else:
            views = [None] * 5 + views
        if not bool(mask.all()):
            pad = ~mask.to(first.device)[None, :, :, None]
            for v in views:
                if v is not None:
                    v.masked_fill_(pad, float("nan"))
        return GateTrace(*views, mask=mask.to(first.device), reconstruction_error=worst, num_directions=D)

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: refuse in one clear line (see the module docstring)."""
        raise RuntimeError(
            f"{type(self).__name__} cannot be scripted with torch.jit.script: TorchScript cannot express its "
            "keyword-only lengths=/return_gates= or the GateTrace it returns (and scripting nn.LSTM itself "
            "yields no forward on recent torch). Use torch.compile, or eager mode.")


class GateLSTM(_Traced, nn.LSTM):
    """`nn.LSTM` whose forward can also return a `GateTrace`: same constructor, defaults, parameter
    names, checks, outputs and errors (isinstance(GateLSTM(...), nn.LSTM) is True).

    forward(input, hx=None, *, lengths=None, return_gates=False)
      input, hx: exactly as nn.LSTM: (time, batch, input_size), or (batch, time, input_size) with
          batch_first=True, or unbatched (time, input_size), or a PackedSequence; hx = (h_0, c_0),
          each (num_layers * num_directions, batch, proj_size or hidden_size / hidden_size).
      lengths: optional true lengths (batch,) of a padded input: outputs past a sequence's end are
          zero and (h_n, c_n) are taken at each sequence's own last step (for the reverse direction:
          it starts at that step), as if each sequence ran alone.
      returns (output, (h_n, c_n)) exactly as nn.LSTM, plus a GateTrace when return_gates.
    Errors: nn.LSTM's ValueError/RuntimeError, with its messages, raised before any kernel call
    (also for packed input, where nn.LSTM itself does not check); ValueError for bad lengths.
    """

    _kind, _torch_class = "LSTM", nn.LSTM

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device=device, dtype=dtype)

    def _state_tuple(self, hx):
        return None if hx is None else (hx[0], hx[1])

    def _fused(self, inp, batch_sizes, hx, weights):
        if batch_sizes is None:
            out, h, c = _VF.lstm(inp, hx, weights, self.bias, 1, 0.0, self.training, self.bidirectional,
                                 self.batch_first)
        else:
            out, h, c = _VF.lstm(inp, batch_sizes, hx, weights, self.bias, 1, 0.0, self.training,
                                 self.bidirectional)
        return out, (h, c)

    def _kernel_traceable(self, input, hx, lengths) -> bool:
        """Whether oneDNN's training kernel can run this traced forward and hand over its gates: float32 on CPU
        with oneDNN on, a padded or dense input (not a PackedSequence), outside torch.compile and autocast; with
        lengths= only without a graph and without inter-layer dropout (the recovery path draws that on packed
        data, as the untraced pass does). With projections too (nn.LSTM itself has no oneDNN path for them): see
        `_projected`."""
        if not (_KERNEL_GATES and torch.backends.mkldnn.enabled) or isinstance(input, PackedSequence):
            return False
        tensors = [input, *hx, *self._flat_weights]
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors) or not input.numel():
            return False
        if torch.compiler.is_compiling() or _autocast_cpu():
            return False
        return lengths is None or not (torch.is_grad_enabled() or (self.training and self.dropout > 0
                                                                   and self.num_layers > 1))

    def _kernel_pass(self, input, hx, lengths, is_batched):
        """Every layer and direction through oneDNN's LSTM training kernel (nn.LSTM's own CPU kernel), whose
        workspace keeps each step's activated gates and cell: the trace reads them from there (no second matrix
        product, no recurrence). With one layer and direction and no graph, the kernel runs over the whole sequence
        in one call and the trace is views into its workspace (and `hidden` into the output): nothing is copied.
        Otherwise it runs a few steps per call and each call's rows are copied into the trace. The self-check
        o_t * tanh(c_t) == h_t runs when `reconstruction_error` is first read. Returns (output, (h_n, c_n),
        GateTrace) as `_run`, or None where the kernel does not apply (`_kernel_traceable`) or its workspace
        fails the layout check (then `_trace` recovers the gates by one matrix product)."""
        global _KERNEL_GATES
        if not self._kernel_traceable(input, hx, lengths):
            return None
        dense = input if is_batched else input.unsqueeze(0 if self.batch_first else 1)
        x = dense.transpose(0, 1) if self.batch_first else dense
        T, B = x.shape[:2]
        D, H, L = 2 if self.bidirectional else 1, self.hidden_size, self.num_layers
        P = self.proj_size or H
        lens = None if lengths is None else torch.as_tensor(lengths).cpu()
        if lens is not None and bool((lens == T).all()):
            lens = None  # every sequence is full length: the dense pass
        real = None if lens is None else torch.arange(T)[:, None] < lens[None, :]  # (T, B)
        rev = None if lens is None or D == 1 else _reverse_index(lens, T)
        graph = torch.is_grad_enabled()  # the workspace exists only in grad mode: without a graph, run detached
        prep = (lambda t: t) if graph else (lambda t: t.detach())
        in_place = (_TRACE_VIEWS and L * D == 1 and not graph  # a graph's workspace is autograd's: copy, never view
                    and T * B * 4 * H * 16 <= _VIEW_BYTES)
        if not in_place:
            chunk = max(1, min(T, _CHUNK_BYTES // (B * 4 * H * 16)))
            # one layer without a graph: `hidden` is a view of the output, which holds every direction's h_t (and
            # is written in place, as every layer's output is without a graph)
            shared = L == 1 and not graph
            bufs = _buffers(x, gates=(L * D, T, B, 4, H), cell=(L * D, T, B, H),
                            **({"output": (T, B, D * P)} if shared else {"hidden": (L * D, T, B, P)}),
                            **({"unprojected": (T, B, H)} if self.proj_size and not graph else {}))
            gates, cell = bufs["gates"], bufs["cell"]
            layer_out = bufs["output"] if shared else None if graph else x.new_empty(T, B, D * P)
            hidden = layer_out.view(T, B, D, P).permute(2, 0, 1, 3) if shared else bufs["hidden"]
        h_n, c_n, projections = [], [], []

        def project(m: Tensor, w_hr: Tensor) -> Tensor:  # (..., H) -> (..., P): W_hr m, differentiable with a graph
            if graph:
                return F.linear(m, w_hr)
            return _linear(m.reshape(-1, H), w_hr, w_hr.new_zeros(P)).view(*m.shape[:-1], P)

        inp = prep(x).contiguous()
        with torch.enable_grad():
            for k in range(L):
                outs = []
                if k and not (graph or in_place):
                    layer_out = x.new_empty(T, B, D * P)
                for d in range(D):
                    e = k * D + d
                    w = [prep(t).contiguous() for t in self._direction_weights(k, d)]
                    w_hr = w.pop() if self.proj_size else None
                    if not self.bias:
                        w += [x.new_zeros(4 * H), x.new_zeros(4 * H)]
                    h0, c0 = (prep(s[e]).contiguous() for s in hx)
                    if w_hr is not None:
                        projections.append(w_hr.detach().clone())  # the self-check's, as the weights are now
                    if in_place:
                        src = inp
                        if w_hr is not None:
                            src, w, h0 = _projected(inp, w, h0, w_hr, first=0)
                        res = _kernel_call(src, h0, c0, w, self.bias, False)
                        if res is None:
                            _KERNEL_GATES = False
                            return None
                        out, h_last, c_last, gates, cell = res
                        cell[-1].copy_(c_last)  # the kernel's last cell is in c_n only
                        if w_hr is not None:
                            out, h_last = project(out, w_hr), project(h_last, w_hr)
                        gates, cell, hidden = gates[None], cell[None], out[None]
                    else:
                        gathered = d and rev is not None  # reversed within each length, run forwards
                        src = torch.gather(inp, 0, _time_index(rev, inp)) if gathered else inp
                        if w_hr is not None:  # the kernel's first processed row: T - 1 when it runs in reverse
                            src, w, h0 = _projected(src, w, h0, w_hr, first=T - 1 if d and not gathered else 0)
                        part = None if graph else layer_out[..., d * P : (d + 1) * P]
                        direct = w_hr is None  # the kernel's output is the layer's: written where it belongs
                        if not direct:  # every m_t to one scratch buffer (no graph), projected below
                            into = None if graph else bufs["unprojected"]
                        else:  # a gathered direction's output is in processing order: placed below
                            into = None if gathered else part
                        res = _kernel_direction(src, h0, c0, w, self.bias, d == 1, chunk, gates[e], cell[e],
                                                hidden[e] if direct and not shared else None,
                                                rev if gathered else None, into)
                        if res is None:
                            _KERNEL_GATES = False
                            return None
                        out, (h_last, c_last) = res
                        if w_hr is not None:
                            out, h_last = project(out, w_hr), project(h_last, w_hr)
                        if gathered:
                            out = torch.gather(out, 0, _time_index(rev, out))  # rev is its own inverse
                        if part is not None and (gathered or not direct):
                            part.copy_(out)
                        if not direct and not shared:  # (shared: `hidden` is the output, written above)
                            with torch.no_grad():
                                hidden[e].copy_(out)
                    outs.append(out)
                    if lens is not None:
                        at = lens - 1 if d == 0 else torch.zeros_like(lens)
                        h_last, c_last = hidden[e][at, torch.arange(B)], cell[e][at, torch.arange(B)]
                    h_n.append(h_last)
                    c_n.append(c_last)
                out = layer_out if not (graph or in_place) else torch.cat(outs, -1) if D > 1 else outs[0]
                if k < L - 1 and self.dropout > 0 and self.training:
                    out = out.transpose(0, 1) if self.batch_first else out
                    out = self.inter_layer_dropout(out, None, None)
                    out = out.transpose(0, 1) if self.batch_first else out
                inp = out.contiguous()
        if not graph:
            out = out.detach()
        if real is not None:
            out = out.masked_fill(~real[..., None], 0.0)  # as pad_packed_sequence pads (a new tensor: the trace
            # keeps the kernel's output, NaN on padding)
        output = out.transpose(0, 1) if self.batch_first else out
        state = (torch.stack(h_n), torch.stack(c_n))
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            state = tuple(s.squeeze(1) for s in state)
        views = [v.transpose(1, 2) for v in (gates, cell, hidden)]
        views = [views[0][..., j, :] for j in range(4)] + views[1:]
        mask = torch.ones(B, T, dtype=torch.bool) if real is None else real.T.contiguous()
        if real is not None:
            for v in views:
                v.masked_fill_(~mask[None, :, :, None], float("nan"))
        proj = torch.stack(projections) if projections else None
        trace = GateTrace(*views, mask=mask, num_directions=D,
                          reconstruction_error=lambda: _trace_error(*views[3:], mask, proj))
        if not in_place:
            _release(bufs)
        return output, state, trace

    def _recover(self, x, h, state, w, real, order):
        w_ih, w_hh = w[:2]
        b = w[2] + w[3] if self.bias else None
        w_hr = w[-1] if self.proj_size else None
        gates, cell, hidden, err = _lstm_gates(x, h, state[0], state[1], w_ih, w_hh, b, w_hr, real, order)
        return [gates, cell, hidden], err

    def forward(self, input, hx=None, *, lengths=None, return_gates: bool = False):
        output, state, trace = self._run(input, hx, lengths, return_gates)
        return (output, state, trace) if return_gates else (output, state)


class VanillaRNN(_Traced, nn.RNN):
    """`nn.RNN` (tanh or relu) with the same extras as GateLSTM: h_t = act(W_ih x_t + W_hh h_{t-1} + b).

    forward(input, hx=None, *, lengths=None, return_gates=False) returns (output, h_n) exactly as
    nn.RNN, plus a GateTrace holding `hidden` only when return_gates.
    """

    _kind, _torch_class = "RNN", nn.RNN

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, **kwargs):
        # **kwargs: so that proj_size= meets nn.RNN's own ValueError, as nn.RNN(..., proj_size=k) does
        super().__init__(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype, **kwargs)

    def _state_tuple(self, hx):
        return None if hx is None else (hx,)

    def _fused(self, inp, batch_sizes, hx, weights):
        fn = _VF.rnn_relu if self.nonlinearity == "relu" else _VF.rnn_tanh
        if batch_sizes is None:
            out, h = fn(inp, hx[0], weights, self.bias, 1, 0.0, self.training, self.bidirectional, self.batch_first)
        else:
            out, h = fn(inp, batch_sizes, hx[0], weights, self.bias, 1, 0.0, self.training, self.bidirectional)
        return out, (h,)

    def _recover(self, x, h, state, w, real, order):
        b = w[2] + w[3] if self.bias else None
        hidden, err = _rnn_hidden_check(x, h, state[0], w[0], w[1], b, self.nonlinearity == "relu", real, order)
        return [hidden], err

    def forward(self, input, hx=None, *, lengths=None, return_gates: bool = False):
        output, (h_n,), trace = self._run(input, hx, lengths, return_gates)
        return (output, h_n, trace) if return_gates else (output, h_n)
