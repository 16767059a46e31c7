"""GateLSTM: an LSTM that shows its gates, trained through the fused kernel.

The LSTM walk-through, one step (gate order i, f, g, o, as in `nn.LSTM`):

    input_gate   i_t = sigmoid(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)   how much to write
    forget_gate  f_t = sigmoid(W_if x_t + b_if + W_hf h_{t-1} + b_hf)   how much to keep
    candidate    g_t = tanh   (W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)   what to write
    output_gate  o_t = sigmoid(W_io x_t + b_io + W_ho h_{t-1} + b_ho)   how much to show
    cell         c_t = f_t * c_{t-1} + i_t * g_t
    hidden       h_t = o_t * tanh(c_t)

`reference_step` is that walk-through, line by line. `GateLSTM` never runs it in training: it
runs each layer through the fused kernel (cuDNN on GPU, oneDNN/ATen on CPU) and, only when
asked for gates, recovers them exactly from what the kernel returned. Every h_t is known, so
all pre-activations of a layer are one batched matrix product over all steps; the cell is a
cheap elementwise recurrence; and o_t * tanh(c_t) must give back h_t, a free self-check.

Layers run one fused call at a time so each layer's input (after inter-layer dropout) is known.
Parameters keep `nn.LSTM`'s names and layout, so state dicts load both ways with strict=True.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import _VF, Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

__all__ = ["GateLSTM", "GateTrace", "VanillaRNN", "reference_step", "reference_lstm"]


@dataclass
class GateTrace:
    """Per-step activations, each (num_layers, batch, time, hidden_size), detached from autograd.

    Steps past a sequence's length are NaN (so nan-aware statistics skip them) and `mask`
    (batch, time) is True on real steps. A vanilla RNN's trace holds `hidden` only.
    """

    input_gate: Tensor | None
    forget_gate: Tensor | None
    candidate: Tensor | None
    output_gate: Tensor | None
    cell: Tensor | None
    hidden: Tensor
    mask: Tensor
    # max |o_t * tanh(c_t) - h_t| over real steps: the recovered gates reproduce the fused pass
    reconstruction_error: float = 0.0

    GATES = ("input_gate", "forget_gate", "candidate", "output_gate")

    def items(self):
        """(name, tensor) for every recorded activation."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) and f.name != "mask":
                yield f.name, value

    def layer(self, k: int) -> dict[str, Tensor]:
        return {name: value[k] for name, value in self.items()}


def reference_step(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor):
    """One LSTM step written as the walk-through reads. Returns (h, c, gates dict)."""
    pre = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    i, f, g, o = pre.chunk(4, dim=-1)
    input_gate = torch.sigmoid(i)
    forget_gate = torch.sigmoid(f)
    candidate = torch.tanh(g)
    output_gate = torch.sigmoid(o)
    cell = forget_gate * c + input_gate * candidate  # forget some of the old, write some of the new
    hidden = output_gate * torch.tanh(cell)  # show a filtered view of the cell
    gates = dict(input_gate=input_gate, forget_gate=forget_gate, candidate=candidate, output_gate=output_gate)
    return hidden, cell, gates


def reference_lstm(lstm: GateLSTM | nn.LSTM, x: Tensor, state: tuple[Tensor, Tensor] | None = None):
    """The naive per-step loop (batch-first x, eval semantics): (output, (h_n, c_n), GateTrace).

    For tests and teaching; it is what GateLSTM's fast path must equal.
    """
    B, T, _ = x.shape
    L, H = lstm.num_layers, lstm.hidden_size
    if state is None:
        state = (x.new_zeros(L, B, H), x.new_zeros(L, B, H))
    record = {name: [] for name in (*GateTrace.GATES, "cell", "hidden")}
    h_n, c_n, inp = [], [], x
    for k in range(L):
        w = [getattr(lstm, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        h, c = state[0][k], state[1][k]
        steps = {name: [] for name in record}
        for x_t in inp.unbind(1):  # unbind, not x[:, t]: indexing per step makes backward O(T^2)
            h, c, gates = reference_step(x_t, h, c, *w)
            for name, value in (*gates.items(), ("cell", c), ("hidden", h)):
                steps[name].append(value)
        for name in record:
            record[name].append(torch.stack(steps[name], dim=1))
        h_n.append(h)
        c_n.append(c)
        inp = record["hidden"][-1]
    trace = GateTrace(**{n: torch.stack(v) for n, v in record.items()}, mask=x.new_ones(B, T, dtype=torch.bool))
    return inp, (torch.stack(h_n), torch.stack(c_n)), trace


def _onednn_linear_available() -> bool:
    try:
        a = torch.ones(2, 3)
        return bool(torch.ops.mkldnn._linear_pointwise(a, torch.ones(4, 3), torch.zeros(4), "none", [], "")[0, 0] == 3)
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _onednn_linear_available()


def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """x @ w.T + b. On CPU in float32, oneDNN's matmul (the library behind the fused LSTM kernel)
    ran these tall-skinny products about 2x faster than the default BLAS path on our 2-core machine."""
    if _ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return torch.addmm(b, x, w.T)


class _FusedRecurrent(nn.Module):
    """Shared body: nn.LSTM/nn.RNN parameter layout, one fused kernel call per layer."""

    gate_count = 4

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
                 batch_first: bool = True):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.dropout, self.batch_first = float(dropout), batch_first
        G = self.gate_count * hidden_size
        for k in range(num_layers):
            layer_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(G, layer_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(G, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(G)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(G)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # nn.LSTM's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def layer_weights(self, k: int) -> list[Tensor]:
        return [getattr(self, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}")

    def inter_layer_dropout(self, out: Tensor, batch_sizes: Tensor | None, sorted_indices: Tensor | None) -> Tensor:
        """nn.LSTM's dropout between layers, on a layer's output: dense in x's layout, or a PackedSequence's
        data (time-major rows, batch in `sorted_indices` order). A hook: subclasses may draw other masks."""
        return F.dropout(out, self.dropout, training=True)

    # --- the fused pass -------------------------------------------------------------------

    def _fused_layer(self, inp: Tensor, batch_sizes: Tensor | None, hx, k: int):
        raise NotImplementedError

    def _run(self, x: Tensor | PackedSequence, lengths: Tensor | None, hx: tuple[Tensor, ...] | None):
        """Returns (output like the input, final state tuple, per-layer (input, output) as padded batch-first)."""
        packed = x if isinstance(x, PackedSequence) else None
        if packed is None and lengths is not None:
            packed = pack_padded_sequence(x, torch.as_tensor(lengths).cpu(), batch_first=self.batch_first,
                                          enforce_sorted=False)
        if packed is not None:
            inp, batch_sizes, B = packed.data, packed.batch_sizes, int(packed.batch_sizes[0])
        else:
            inp, batch_sizes, B = x, None, x.shape[0 if self.batch_first else 1]
        L, H = self.num_layers, self.hidden_size
        if hx is None:
            zeros = inp.new_zeros(L, B, H)
            hx = (zeros,) * (2 if self.gate_count == 4 else 1)
        elif packed is not None and packed.sorted_indices is not None:
            hx = tuple(h.index_select(1, packed.sorted_indices) for h in hx)  # as nn.LSTM does

        finals, layers = [], []
        for k in range(L):
            out, state = self._fused_layer(inp, batch_sizes, tuple(h[k : k + 1] for h in hx), k)
            finals.append(state)
            layers.append((inp, out))
            if k < L - 1 and self.dropout > 0 and self.training:
                out = self.inter_layer_dropout(out, batch_sizes, packed.sorted_indices if packed is not None else None)
            inp = out
        final = tuple(torch.cat(parts) for parts in zip(*finals))

        if packed is None:
            return out, final, layers, None
        if packed.unsorted_indices is not None:
            final = tuple(h.index_select(1, packed.unsorted_indices) for h in final)
        rewrap = lambda data: PackedSequence(data, batch_sizes, packed.sorted_indices, packed.unsorted_indices)  # noqa: E731
        output = rewrap(out)
        if not isinstance(x, PackedSequence):
            total = x.shape[1 if self.batch_first else 0]
            output = pad_packed_sequence(output, batch_first=self.batch_first, total_length=total)[0]
        return output, final, [(rewrap(i), rewrap(o)) for i, o in layers], packed

    def _padded(self, seq: Tensor | PackedSequence, total: int) -> Tensor:
        """Batch-first dense view of a layer's input or output."""
        if isinstance(seq, PackedSequence):
            return pad_packed_sequence(seq, batch_first=True, total_length=total)[0]
        return seq if self.batch_first else seq.transpose(0, 1)

    def _lengths_and_total(self, x, lengths):
        if isinstance(x, PackedSequence):
            _, lens = pad_packed_sequence(x, batch_first=True)
            return lens, int(lens.max())
        T = x.shape[1 if self.batch_first else 0]
        B = x.shape[0 if self.batch_first else 1]
        return (torch.as_tensor(lengths).cpu() if lengths is not None else torch.full((B,), T)), T


class GateLSTM(_FusedRecurrent):
    """Drop-in `nn.LSTM` (unidirectional) whose forward can also return a `GateTrace`.

    forward(x, state=None, lengths=None, return_gates=False)
      x: (batch, time, input) if batch_first, or a PackedSequence as nn.LSTM takes.
      lengths: optional true lengths of a padded x; outputs past a sequence's end are zero and
               (h_n, c_n) are taken at each sequence's own last step, as if run alone.
      returns (output, (h_n, c_n)) exactly as nn.LSTM, plus a GateTrace when return_gates.
    """

    gate_count = 4

    def _fused_layer(self, inp, batch_sizes, hx, k):
        w = self.layer_weights(k)
        if batch_sizes is None:
            out, h, c = _VF.lstm(inp, hx, w, True, 1, 0.0, self.training, False, self.batch_first)
        else:
            out, h, c = _VF.lstm(inp, batch_sizes, hx, w, True, 1, 0.0, self.training, False)
        return out, (h, c)

    def forward(self, x, state: tuple[Tensor, Tensor] | None = None, lengths: Tensor | None = None,
                return_gates: bool = False):
        output, (h_n, c_n), layers, _ = self._run(x, lengths, state)
        if not return_gates:
            return output, (h_n, c_n)
        return output, (h_n, c_n), self.trace(x, lengths, state, layers)

    @torch.no_grad()
    def trace(self, x, lengths, state, layers) -> GateTrace:
        """Recover every gate from the fused pass: one matmul per layer, then the cell recurrence."""
        lens, T = self._lengths_and_total(x, lengths)
        first = self._padded(layers[0][0], T)
        B, H, L = first.shape[0], self.hidden_size, self.num_layers
        mask = (torch.arange(T)[None, :] < lens[:, None]).to(first.device)  # (B, T), True on real steps
        h0, c0 = state if state is not None else (first.new_zeros(L, B, H),) * 2
        # time-major buffers, so each step's slice is contiguous for the cell recurrence
        gates, cells, hiddens, worst = [], [], [], 0.0
        for k, (inp, out) in enumerate(layers):
            w_ih, w_hh, b_ih, b_hh = self.layer_weights(k)
            I = w_ih.shape[1]
            # rows t of xh hold [x_t, h_{t-1}] (h_{-1} = h0); row T holds h_{T-1}, so that the
            # hidden trace is a view of this buffer and never copied again
            xh = first.new_empty(T + 1, B, I + H)
            xh[:T, :, :I] = self._padded(inp, T).transpose(0, 1)
            xh[T, :, :I] = 0
            xh[0, :, I:] = h0[k]
            xh[1:, :, I:] = self._padded(out, T).transpose(0, 1)
            hidden = xh[1:, :, I:]
            # all pre-activations in one product: [x_t, h_{t-1}] @ [W_ih, W_hh]^T + b. The candidate's
            # rows are doubled so one sigmoid serves all four: tanh(z) = 2 sigmoid(2z) - 1, and a
            # contiguous sigmoid is several times faster than tanh on CPU
            scale = torch.ones(4, 1, dtype=w_ih.dtype, device=w_ih.device)
            scale[2] = 2.0
            w = (torch.cat([w_ih, w_hh], 1).view(4, H, -1) * scale[:, :, None]).view(4 * H, -1)
            b = ((b_ih + b_hh).view(4, H) * scale).view(4 * H)
            g = _linear(xh[:T].view(T * B, -1), w, b).view(T, B, 4, H)
            g.sigmoid_()  # input, forget, output gates (and 2 sigmoid(2z) for the candidate)
            g[:, :, 2].mul_(2).sub_(1)  # candidate: tanh
            i, f, candidate, o = g.unbind(2)
            cell = torch.mul(i, candidate)  # i_t * g_t for every step, then in place:
            c_prev = c0[k]
            for t in range(T):  # c_t = f_t * c_{t-1} + i_t * g_t
                c_prev = cell[t].addcmul_(f[t], c_prev)
            # self-check: o_t * tanh(c_t) must give back the fused pass's h_t (in blocks of steps,
            # so the temporaries stay small and in cache); padded steps do not count
            for t0 in range(0, T, 64):
                span = slice(t0, t0 + 64)
                err = cell[span].mul(2).sigmoid_().mul_(2).sub_(1).mul_(o[span]).sub_(hidden[span]).abs_()
                err = err[mask[:, span].T]  # (steps, B, H) -> real steps only
                worst = max(worst, float(err.max()) if err.numel() else 0.0)
            gates.append(g)
            cells.append(cell)
            hiddens.append(hidden)
        # (T, B, H) per layer -> (L, B, T, H): views when there is one layer, else one stack per name
        def layered(parts):
            return parts[0][None] if L == 1 else torch.stack(parts)

        gates = layered(gates)
        views = [gates[:, :, :, j] for j in range(4)] + [layered(cells), layered(hiddens)]
        views = [v.transpose(1, 2) for v in views]
        if not bool(mask.all()):
            pad = ~mask[None, :, :, None]
            for v in views:
                v.masked_fill_(pad, float("nan"))
        return GateTrace(*views, mask=mask, reconstruction_error=worst)


class VanillaRNN(_FusedRecurrent):
    """The same interface over a tanh RNN (nn.RNN's layout): h_t = tanh(W_ih x_t + W_hh h_{t-1} + b).

    forward returns (output, h_n), plus a GateTrace holding `hidden` only when return_gates.
    """

    gate_count = 1

    def _fused_layer(self, inp, batch_sizes, hx, k):
        w = self.layer_weights(k)
        if batch_sizes is None:
            out, h = _VF.rnn_tanh(inp, hx[0], w, True, 1, 0.0, self.training, False, self.batch_first)
        else:
            out, h = _VF.rnn_tanh(inp, batch_sizes, hx[0], w, True, 1, 0.0, self.training, False)
        return out, (h,)

    def forward(self, x, state: Tensor | None = None, lengths: Tensor | None = None, return_gates: bool = False):
        output, (h_n,), layers, _ = self._run(x, lengths, None if state is None else (state,))
        if not return_gates:
            return output, h_n
        lens, T = self._lengths_and_total(x, lengths)
        mask = torch.arange(T)[None, :] < lens[:, None]
        hidden = torch.stack([self._padded(out, T).detach() for _, out in layers])
        if not bool(mask.all()):
            hidden = hidden.masked_fill(~mask.to(hidden.device)[None, :, :, None], float("nan"))
        return output, h_n, GateTrace(None, None, None, None, None, hidden, mask=mask)
