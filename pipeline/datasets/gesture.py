"""gesture: Wiimote pick-up gestures (PickupGestureWiimoteZ, UCR archive) bundled in aeon.

Ten classes, one channel, lengths 29-361. aeon's test split is the test set; validation is
`val_fraction` of aeon's training split (seeded, stratified). Series are normalised with the
mean and std of the training split (stored in the vocab for predict), then zero-padded:

    x (N, T, 1) float32, lengths (N,) int64, y (N,) int64 (index into vocab["labels"])
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from pipeline.config import DataSection
from pipeline.datasets.common import natural_sorted, pad, require_module, source, split_indices
from pipeline.datasets.prepared import Prepared

TOPOLOGY = "many_to_one"  # the topology these data feed (pipeline/topologies.py)


class GestureData(DataSection):
    """aeon ships a train/test split (its test split is the test set); validation comes out of its training half."""

    source: str = "gesture"
    val_fraction: float = Field(0.2, ge=0.0, lt=0.9)


Data = GestureData  # the `data` section's schema (pipeline.sources)


def load(split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """aeon's unequal-length series as a list of 1-D float arrays, and their string labels."""
    datasets = require_module("aeon.datasets", "pip install aeon")
    series, labels = datasets.load_pickup_gesture_wiimoteZ(split=split)  # list of (1, T_i) arrays
    series = [np.asarray(s, dtype=np.float64).reshape(-1) for s in series]
    return [s[~np.isnan(s)] for s in series], np.asarray(labels).astype(str)


def example() -> np.ndarray:
    """Two real test gestures of different lengths as predict takes them, in raw units and NaN-padded to the
    longer one the UCR/aeon way: (2, T) float64, the logged model's input example."""
    series, _ = load("test")
    first = series[0]
    second = next(s for s in series if len(s) != len(first))
    x = np.full((2, max(len(first), len(second))), np.nan)
    x[0, : len(first)], x[1, : len(second)] = first, second
    return x


def build(cfg: GestureData, seed: int) -> Prepared:
    train_x, train_y = load("train")
    test_x, test_y = load("test")
    labels = natural_sorted([*train_y, *test_y])
    rng = np.random.default_rng(seed)
    parts = split_indices(len(train_y), cfg.val_fraction, 0.0, rng, labels=train_y)
    chosen = {
        "train": ([train_x[i] for i in parts["train"]], train_y[parts["train"]]),
        "val": ([train_x[i] for i in parts["val"]], train_y[parts["val"]]),
        "test": (test_x, test_y),
    }
    steps = np.concatenate(chosen["train"][0])
    mean, std = float(steps.mean()), float(steps.std()) or 1.0
    splits = {}
    for split, (series, names) in chosen.items():
        x, lengths = pad([((s - mean) / std).astype(np.float32) for s in series], dtype=np.float32)
        y = np.array([labels.index(n) for n in names], dtype=np.int64)
        splits[split] = {"x": x[..., None], "lengths": lengths, "y": y}
    return Prepared(
        splits=splits,
        vocab={"labels": labels, "mean": [mean], "std": [std]},
        source=source(
            "aeon",
            "UCR Time Series Archive terms (free for research, cite the archive); aeon BSD-3-Clause",
            "PickupGestureWiimoteZ (UCR archive) as bundled in aeon.datasets.",
        ),
        stats={"unit": "gestures"},
    )
