"""Consecutive windows of one long text for truncated backpropagation through time (TBPTT).

char-rnn's layout (Karpathy 2015; Zaremba et al. 2014's PTB batching): the text is cut into
`batch_size` contiguous streams of equal length, and batch k holds window k of every stream,
one stream per row. Row r of batch k + 1 continues exactly where row r of batch k stopped, so a
model may carry its (h, c) state from one batch to the next (detached: gradients stop at the
window edge) and no character after the first window of a stream is predicted from a zero state.

    text  (n chars)  ->  stream s = chars [offset + s * L, offset + (s + 1) * L)   s = 0 .. S - 1
    batch k, row s   =  x: chars start .. start + T - 1,  y: start + 1 .. start + T,
                        start = offset + s * L + k * T

Training (`shift=True`): L is a whole number of windows T, and the streams start at a seeded
offset in [0, T) drawn from (seed, epoch), so each epoch cuts the windows elsewhere; the same on
every rank and on resume. Evaluation (`shift=False`): offset 0, L = (n - 1) // S and the last
window of each stream may be shorter, so every character but the final (n - 1) mod S is predicted.

N devices: the S global streams are split into contiguous blocks (np.array_split, as
`GlobalBatchSampler` splits a global batch), so rank r always reads the same rows, the k-th global
batch holds the same windows on 1 or N devices, and the carried state of a row stays on its rank.

Each batch is {"x": (B, T) int64, "y": (B, T) int64, "index": (B,) int64 the global start
positions (unique within an epoch: per-sample randomness keys on them), "first": (B,) bool True
where the row starts its stream (the state must restart from zero there)}.

Resume: the pipeline checkpoints at epoch ends only, so a resumed run starts an epoch, whose
first batch has first=True on every row: the carried state restarts from zero exactly where an
uninterrupted run restarts it, and the stream positions come from (seed, epoch) alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from pipeline.config import PipelineError


class StreamBatchSampler(Sampler[list[tuple[int, int, bool]]]):
    """Yields, per batch, this rank's rows as (start, length, first) triples; see the module docstring.

    n_chars: the text's length; block_size: T; streams: S, the global batch size (divisible by world_size).
    Raises PipelineError (one line) when the text cannot give every stream one window."""

    def __init__(self, n_chars: int, block_size: int, streams: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shift: bool = False, epoch_of: Callable[[], int] | None = None):
        if streams % world_size:
            raise PipelineError(f"train.batch_size {streams} is not divisible by the {world_size} devices")
        self.n_chars, self.block_size, self.streams = n_chars, block_size, streams
        self.rank, self.world_size, self.seed, self.shift = rank, world_size, seed, shift
        self.epoch, self.epoch_of = 0, epoch_of
        usable = n_chars - 1 - (block_size - 1 if shift else 0)  # each window needs its next character too
        per_stream = usable // streams
        self.stream_length = per_stream // block_size * block_size if shift else per_stream
        if self.stream_length < (block_size if shift else 1):
            raise PipelineError(f"the text ({n_chars} chars) is too short for {streams} streams of at least "
                                f"{block_size if shift else 1} characters (train.batch_size x train.block_size)")
        self.rows = np.array_split(np.arange(streams), world_size)[rank]

    def set_epoch(self, epoch: int) -> None:  # without epoch_of: call it at every epoch start
        self.epoch = epoch

    def offset(self) -> int:
        """Where stream 0 starts this epoch: 0 without shift, else a draw from (seed, epoch) in [0, T)."""
        if not self.shift:
            return 0
        epoch = self.epoch_of() if self.epoch_of is not None else self.epoch
        return int(np.random.default_rng([self.seed, epoch]).integers(self.block_size))

    def __len__(self) -> int:
        return -(-self.stream_length // self.block_size)

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        offset, T, L = self.offset(), self.block_size, self.stream_length
        for k in range(len(self)):
            length = min(T, L - k * T)
            yield [(offset + int(s) * L + k * T, length, k == 0) for s in self.rows]


class _Positions:
    """The DataLoader's dataset: each item is the sampler's (start, length, first) itself."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item):
        return item


def collate(ids: np.ndarray, rows: list[tuple[int, int, bool]]) -> dict[str, torch.Tensor]:
    """The batch for `rows` of (start, length, first): x = ids[start:start+length], y shifted by one."""
    length = rows[0][1]
    starts = np.array([r[0] for r in rows], dtype=np.int64)
    span = ids[starts[:, None] + np.arange(length + 1)[None, :]]
    return {"x": torch.from_numpy(np.ascontiguousarray(span[:, :-1])),
            "y": torch.from_numpy(np.ascontiguousarray(span[:, 1:])),
            "index": torch.from_numpy(starts),
            "first": torch.tensor([r[2] for r in rows], dtype=torch.bool)}


def stream_loader(ids: np.ndarray, block_size: int, streams: int, *, rank: int = 0, world_size: int = 1,
                  seed: int = 0, shift: bool = False, epoch_of: Callable[[], int] | None = None) -> DataLoader:
    """A DataLoader of consecutive windows of `ids` (n,) int64; see the module docstring."""
    sampler = StreamBatchSampler(len(ids), block_size, streams, rank=rank, world_size=world_size, seed=seed,
                                 shift=shift, epoch_of=epoch_of)
    return DataLoader(_Positions(len(ids)), batch_sampler=sampler, collate_fn=partial(collate, ids))
