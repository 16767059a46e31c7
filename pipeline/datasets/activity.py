"""activity: BasicMotions smartwatch clips (UEA archive, bundled in aeon) joined into streams.

A clip is 100 steps of 6 channels (3-axis accelerometer and gyroscope) of one activity.
aeon's training clips are split into train/val clips first (seeded, stratified); test uses
aeon's test clips only, so no clip is in two splits. A stream is `clips_per_stream` clips of
its split drawn at random (seeded), joined along time, with the activity at every step.
Channels are normalised with the training clips' mean and std (stored in the vocab).

    x (N, T, 6) float32, y (N, T) int64, lengths (N,) int64 (all T: streams are equal length)
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from pipeline.config import DataSection
from pipeline.datasets.common import require_module, source, split_indices
from pipeline.datasets.prepared import Prepared

TOPOLOGY = "many_to_many"  # the topology these data feed (pipeline/topologies.py)


class ActivityData(DataSection):
    """aeon's test clips make the test streams; validation comes out of its training clips."""

    source: str = "activity"
    clips_per_stream: int = Field(4, gt=0)
    train_streams: int = Field(400, gt=0)
    val_streams: int = Field(60, gt=0)
    test_streams: int = Field(60, gt=0)
    val_fraction: float = Field(0.25, ge=0.0, lt=0.9)  # of aeon's training clips


Data = ActivityData  # the `data` section's schema (pipeline.sources)


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(clips (N, 100, 6) float64, string labels (N,)) of aeon's split."""
    datasets = require_module("aeon.datasets", "pip install aeon")
    clips, labels = datasets.load_basic_motions(split=split)  # (N, 6, 100)
    return np.asarray(clips, dtype=np.float64).transpose(0, 2, 1), np.asarray(labels).astype(str)


def streams(clips: np.ndarray, y: np.ndarray, count: int, per_stream: int, rng: np.random.Generator) -> dict:
    """`count` streams of `per_stream` clips each, drawn without replacement within a stream."""
    picks = [rng.choice(len(clips), size=per_stream, replace=len(clips) < per_stream) for _ in range(count)]
    steps = clips.shape[1]
    x = np.stack([np.concatenate(clips[p]) for p in picks]).astype(np.float32)
    labels = np.stack([np.repeat(y[p], steps) for p in picks]).astype(np.int64)
    return {"x": x, "y": labels, "lengths": np.full(count, x.shape[1], dtype=np.int64)}


def example() -> np.ndarray:
    """Two real streams as predict takes them, in raw units: the first two test clips joined (200 steps), and
    the third clip alone (100 steps, NaN-padded): (2, 200, 6) float64, the logged model's input example."""
    clips, _ = load("test")
    steps = clips.shape[1]
    x = np.full((2, 2 * steps, clips.shape[2]), np.nan)
    x[0], x[1, :steps] = np.concatenate(clips[:2]), clips[2]
    return x


def build(cfg: ActivityData, seed: int) -> Prepared:
    train_clips, train_names = load("train")
    test_clips, test_names = load("test")
    labels = sorted({*train_names, *test_names})
    train_y = np.array([labels.index(n) for n in train_names], dtype=np.int64)
    test_y = np.array([labels.index(n) for n in test_names], dtype=np.int64)

    rng = np.random.default_rng(seed)
    parts = split_indices(len(train_y), cfg.val_fraction, 0.0, rng, labels=train_y)
    fit = train_clips[parts["train"]]
    mean, std = fit.mean(axis=(0, 1)), fit.std(axis=(0, 1))
    std = np.where(std > 0, std, 1.0)
    norm = {
        "train": ((fit - mean) / std, train_y[parts["train"]], cfg.train_streams),
        "val": ((train_clips[parts["val"]] - mean) / std, train_y[parts["val"]], cfg.val_streams),
        "test": ((test_clips - mean) / std, test_y, cfg.test_streams),
    }
    splits = {split: streams(c, y, n, cfg.clips_per_stream, rng) for split, (c, y, n) in norm.items()}
    return Prepared(
        splits=splits,
        vocab={"labels": labels, "mean": mean.tolist(), "std": std.tolist()},
        source=source(
            "aeon",
            "UEA/UCR Time Series Archive terms (free for research, cite the archive); aeon BSD-3-Clause",
            "BasicMotions smartwatch clips (UEA archive) from aeon.datasets, joined into labelled streams.",
        ),
        stats={
            "unit": "streams",
            "clips": {"train": len(parts["train"]), "val": len(parts["val"]), "test": len(test_y)},
            "clips_per_stream": cfg.clips_per_stream,
        },
    )
