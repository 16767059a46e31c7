"""The DataModule over data/prepared/<task>/, and the sampler that makes N devices act as one.

`GlobalBatchSampler` draws one seeded permutation per epoch, the same whatever the device count,
cuts it into global batches of `batch_size` and hands rank r its r-th slice of each. So the k-th
global batch holds the same samples on 1 or N devices, and DDP's gradient average equals the
single-device gradient. (Lightning's DistributedSampler forces shuffling per rank: with it a
2-process run differed from a 1-process one by 0.17 in loss from the first step.)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from pipeline.batch import PADDED  # length arrays -> the padded arrays they describe
from pipeline.config import PipelineError
from pipeline.datasets.prepared import load_split, load_vocab


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, epoch_of: Callable[[], int] | None = None):
        if batch_size % world_size:
            raise PipelineError(f"train.batch_size {batch_size} is not divisible by the {world_size} devices")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.epoch = seed, shuffle, drop_last, 0
        self.epoch_of = epoch_of  # asked at each pass when given (the fit loop's epoch), else set_epoch's value

    def set_epoch(self, epoch: int) -> None:  # without epoch_of: call it at every epoch start
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        # a short last batch is split too: a rank whose share of it would be empty stops one batch early
        return full + int(not self.drop_last and self.rank < rest)

    def __iter__(self):
        if self.shuffle:
            epoch = self.epoch_of() if self.epoch_of is not None else self.epoch
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).numpy()
        else:
            order = np.arange(self.n)
        for k in range(len(self)):
            batch = order[k * self.batch_size : (k + 1) * self.batch_size]
            yield np.array_split(batch, self.world_size)[self.rank].tolist()


def char_windows(ids: np.ndarray, block_size: int) -> dict[str, np.ndarray]:
    """Non-overlapping windows of a character stream: x = chars t..t+n-1, y = t+1..t+n."""
    count = (len(ids) - 1) // block_size
    if count < 1:
        raise PipelineError(f"the text ({len(ids)} chars) is shorter than train.block_size + 1 ({block_size + 1})")
    starts = np.arange(count) * block_size
    span = starts[:, None] + np.arange(block_size + 1)[None, :]
    windows = ids[span]
    return {"x": windows[:, :-1], "y": windows[:, 1:]}


def collate(arrays: dict[str, np.ndarray], indices: list[int]) -> dict[str, torch.Tensor]:
    """The samples at `indices`, padded arrays trimmed to the longest member, and `index`: the global
    sample indices themselves (int64), which training's per-sample randomness keys on."""
    idx = np.asarray(indices, dtype=np.int64)
    batch = {name: torch.from_numpy(np.ascontiguousarray(a[idx])) for name, a in arrays.items()}
    batch["index"] = torch.from_numpy(idx)
    for lengths, padded in PADDED.items():
        if lengths in batch and len(idx):
            longest = int(batch[lengths].max())
            for name in padded:
                if name in batch and batch[name].ndim >= 2:
                    batch[name] = batch[name][:, :longest]
    return batch


class PreparedDataModule(L.LightningDataModule):
    def __init__(self, data_dir: str | Path, batch_size: int, seed: int, block_size: int = 128):
        super().__init__()
        self.data_dir, self.batch_size, self.seed, self.block_size = Path(data_dir), batch_size, seed, block_size
        self.vocab = load_vocab(self.data_dir)
        self._splits: dict[str, dict[str, np.ndarray]] = {}

    def split(self, name: str) -> dict[str, np.ndarray]:
        if name not in self._splits:
            arrays = load_split(self.data_dir, name)
            if "ids" in arrays:  # a character stream: cut it into training windows
                arrays = char_windows(arrays["ids"], self.block_size)
            self._splits[name] = arrays
        return self._splits[name]

    def dims(self) -> dict:
        """What a model needs to size its input: the shape of one sample's x, if x is features."""
        x = self.split("train").get("x")
        return {"input_shape": list(x.shape[1:])} if x is not None and x.dtype.kind == "f" else {}

    def loader(self, split: str, *, shuffle: bool = False, drop_last: bool = False, rank: int = 0,
               world_size: int = 1, batch_size: int | None = None, epoch_of: Callable[[], int] | None = None
               ) -> DataLoader:
        arrays = self.split(split)
        n = len(next(iter(arrays.values())))
        sampler = GlobalBatchSampler(n, batch_size or self.batch_size, rank=rank, world_size=world_size,
                                     seed=self.seed, shuffle=shuffle, drop_last=drop_last and n >= self.batch_size,
                                     epoch_of=epoch_of)
        return DataLoader(range(n), batch_sampler=sampler, collate_fn=partial(collate, arrays))

    def _ranks(self) -> dict:
        trainer = self.trainer  # set by Lightning when fitting (LightningDataModule has no `_trainer`)
        return {"rank": trainer.global_rank, "world_size": trainer.world_size} if trainer else {}

    def _fit_epoch(self) -> int:
        # The epoch the fit loop draws batches for: what Lightning passes to set_epoch, which it calls on a
        # loader's `sampler` and `batch_sampler.sampler` only, never on a batch sampler such as ours.
        return self.trainer.fit_loop.epoch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        epoch_of = self._fit_epoch if self.trainer is not None else None
        return self.loader("train", shuffle=True, drop_last=True, epoch_of=epoch_of, **self._ranks())

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", **self._ranks())
