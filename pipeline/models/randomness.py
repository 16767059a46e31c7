"""Training randomness as a function of (seed, epoch, global sample index), never of the rank.

Each batch carries `index`, the global indices of its samples (pipeline.datasets.datamodule).
While a training step runs, `per_sample(seed, epoch, index)` is active; every draw inside it
(dropout masks, augmentation shifts) is a counter-based hash (splitmix64) of

    (seed, epoch, sample index, draw number within the step, element coordinate)

so sample i gets the same mask on 1 or N devices, whatever rank holds it and whatever else
shares its local batch, and a resumed run draws exactly what the uninterrupted one drew. The
element coordinate of a (B, T, H) tensor is t * H + h: it does not depend on T, which each rank
trims to its own longest sequence. Outside a training step the draws fall back to torch's RNG
(ordinary nn.Dropout behaviour), so the modules work as usual in notebooks and tests.

Cost: a handful of int64 element-wise ops per masked element; it runs only where p > 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _srl(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix(z: Tensor) -> Tensor:
    """splitmix64's finalizer on int64 tensors (wrapping arithmetic): a bijective 64-bit hash."""
    z = z + _signed(_GOLDEN)
    z = (z ^ _srl(z, 30)) * _signed(_M1)
    z = (z ^ _srl(z, 27)) * _signed(_M2)
    return z ^ _srl(z, 31)


def uniform(keys: Tensor) -> Tensor:
    """float32 in [0, 1) from int64 hash keys (the top 24 bits: exact in float32)."""
    return _srl(mix(keys), 40).to(torch.float32) * (1.0 / (1 << 24))


@dataclass
class _Context:
    row_keys: Tensor  # (B,) int64: hash(seed, epoch, sample index) per local row
    draws: int = 0  # draws made so far in this step: each gets its own stream


_active: _Context | None = None


@contextmanager
def per_sample(seed: int, epoch: int, index: Tensor) -> Iterator[None]:
    """Make the draws inside depend on (seed, epoch, global sample index) only. `index`: (B,) int64."""
    global _active
    base = mix(torch.tensor(_signed(int(seed) & (2**64 - 1)), dtype=torch.int64) ^ mix(torch.tensor(int(epoch))))
    previous, _active = _active, _Context(mix(base.to(index.device) ^ index.to(torch.int64)))
    try:
        yield
    finally:
        _active = previous


def active() -> bool:
    return _active is not None


def _stream_keys(rows: Tensor) -> Tensor:
    """Per-row keys of the next draw; `rows` (R,) are local batch rows (0..B-1) the draw's rows belong to."""
    assert _active is not None
    _active.draws += 1
    return mix(_active.row_keys.to(rows.device)[rows] ^ mix(torch.tensor(_active.draws, device=rows.device)))


def row_uniform(batch: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """(batch, count) uniforms in [0, 1), one row per local sample: per-sample when active, torch.rand otherwise."""
    if _active is None:
        return torch.rand(batch, count, device=device)
    keys = _stream_keys(torch.arange(batch, device=device))
    return uniform(keys[:, None] * _signed(_GOLDEN) + torch.arange(count, device=device)[None, :])


def _keep_mask(p: float, rows: Tensor, steps: Tensor | None, shape_rest: tuple[int, ...], device) -> Tensor:
    """Boolean keep mask (R, *shape_rest) for rows of samples `rows` at time steps `steps` (R,) or None."""
    keys = _stream_keys(rows)
    inner = int(torch.Size(shape_rest).numel())
    element = torch.arange(inner, device=device).reshape(shape_rest)
    if steps is not None:  # packed rows: one time step each; the coordinate is t * H + h
        element = steps.reshape(-1, *([1] * len(shape_rest))) * inner + element
    else:
        element = element.expand(len(rows), *shape_rest)
    key = keys.reshape(-1, *([1] * len(shape_rest))) * _signed(_GOLDEN) + element
    return uniform(key) >= p


def dropout(x: Tensor, p: float, training: bool = True, batch_dim: int = 0) -> Tensor:
    """F.dropout with per-sample masks while `per_sample` is active; `batch_dim` says which axis is the batch."""
    if not training or p == 0.0:
        return x
    if _active is None:
        return F.dropout(x, p, training=True)
    moved = x.movedim(batch_dim, 0)
    keep = _keep_mask(p, torch.arange(moved.shape[0], device=x.device), None, tuple(moved.shape[1:]), x.device)
    return (moved * keep.to(x.dtype) * (1.0 / (1.0 - p))).movedim(0, batch_dim)


def packed_dropout(data: Tensor, p: float, batch_sizes: Tensor, sorted_indices: Tensor | None) -> Tensor:
    """Dropout on a PackedSequence's data (rows: time-major, within a step the batch in sorted order)."""
    if p == 0.0:
        return data
    if _active is None:
        return F.dropout(data, p, training=True)
    sizes = batch_sizes.to(data.device)
    steps = torch.repeat_interleave(torch.arange(len(sizes), device=data.device), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.arange(len(data), device=data.device) - starts[steps]  # place within its step
    rows = sorted_indices.to(data.device)[position] if sorted_indices is not None else position
    keep = _keep_mask(p, rows, steps, tuple(data.shape[1:]), data.device)
    return data * keep.to(data.dtype) * (1.0 / (1.0 - p))


class SampleDropout(nn.Dropout):
    """nn.Dropout whose mask for a sample depends on (seed, epoch, sample index) in training steps.

    Input (B, ...) with the batch first; same output and scaling as nn.Dropout. Same state_dict."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
