"""fraud: rare-event detection on tabular rows, river 0.26.1's `Shuttle` (UCI Statlog Shuttle, ODDS version).

49,097 rows of nine numeric sensor readings from a NASA space shuttle (`f1`..`f9`, integers), 3,511
(7.2%) of them anomalies: the rare classes of the UCI set against the majority "Rad Flow" class.
The shape of card-fraud data (a rare positive class among many ordinary rows, numeric features,
judged by precision and recall on the positives), shipped as a file in river's package and read
without importing river (`datasets/shuttle.csv.gz`). river's `CreditCard` downloads at run time,
so it is not used; its `Phishing` set is 44% positive, 1,250 rows with only 625 distinct feature
vectors (half the rows repeat another), too small and too balanced for a fraud-style evaluation.

Rows are subsampled (seeded) to `max_rows`, split stratified by label (seeded), and standardized
with the training split's mean and std per feature (stored in the vocab for predict):

    x (N, 9) float32: standardized features, one row = one input step of the one_to_one model
    y (N,) int64: 0 normal, 1 anomaly

`example()` gives raw rows as predict takes them: a DataFrame with the named feature columns. The task's
evaluation and serving (its topology VARIANT): pipeline/models/detection.py.
"""

from __future__ import annotations

import csv
import gzip

import numpy as np
from pydantic import Field

from pipeline.config import PipelineError, SplitData
from pipeline.datasets.common import package_dir, source, split_indices, subsample
from pipeline.datasets.prepared import Prepared

TOPOLOGY = "one_to_one"  # the topology these data feed (pipeline/topologies.py)
VARIANT = "pipeline.models.detection:FRAUD"  # its evaluation (PR-AUC, F1, logistic regression) and serving


class FraudData(SplitData):
    source: str = "fraud"
    max_rows: int | None = Field(None, gt=0)  # None: all 49,097 rows of river's Shuttle
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)


Data = FraudData  # the `data` section's schema (pipeline.sources)
LABELS = ["normal", "anomaly"]
PIP = "pip install river==0.26.1"
FILE = "datasets/shuttle.csv.gz"
TARGET = "anomaly"


def read_rows() -> tuple[list[str], np.ndarray, np.ndarray]:
    """(feature names, features (49097, 9) float64, labels (49097,) int64) in file order."""
    path = package_dir("river", PIP) / FILE
    if not path.is_file():
        raise PipelineError(f"{path} not found: not river 0.26.1? {PIP}")
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [list(map(float, row)) for row in reader]
    if TARGET not in header:
        raise PipelineError(f"{path}: no {TARGET!r} column; not river 0.26.1? {PIP}")
    table = np.asarray(rows, dtype=np.float64)
    target = header.index(TARGET)
    features = [name for name in header if name != TARGET]
    return features, np.delete(table, target, axis=1), table[:, target].astype(np.int64)


def example(count: int = 2):
    """Raw rows as predict takes them, the first normal and the first anomalous one: a DataFrame (2, 9)."""
    import pandas as pd

    features, x, y = read_rows()
    first = [int(np.flatnonzero(y == label)[0]) for label in range(len(LABELS))][:count]
    return pd.DataFrame(x[first], columns=features)


def build(cfg: FraudData, seed: int) -> Prepared:
    features, x, y = read_rows()
    rng = np.random.default_rng(seed)
    keep = subsample(len(y), cfg.max_rows, rng)
    x, y = x[keep], y[keep]
    parts = split_indices(len(y), cfg.val_fraction, cfg.test_fraction, rng, labels=y)
    train = x[parts["train"]]
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std == 0] = 1.0
    scaled = ((x - mean) / std).astype(np.float32)
    splits = {name: {"x": scaled[idx], "y": y[idx]} for name, idx in parts.items()}
    return Prepared(
        splits=splits,
        vocab={"labels": LABELS, "features": features, "mean": mean.tolist(), "std": std.tolist()},
        source=source(
            "river",
            "BSD-3-Clause (river); UCI Statlog (Shuttle) data, CC BY 4.0",
            "Shuttle (UCI Statlog Shuttle as ODDS's anomaly set) from river/datasets/shuttle.csv.gz.",
        ),
        stats={"unit": "rows", "positive_rate": {s: round(float(a["y"].mean()), 4) for s, a in splits.items()}},
    )
