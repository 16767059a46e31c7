"""Tiny settings for the tests that prepare, train, evaluate and register real tasks in seconds."""

from __future__ import annotations

from pathlib import Path

TASKS = ("digits", "translation", "charlm")  # one classifier, one seq2seq, one language model


def tiny_raw_params(tmp: Path, **lr: float) -> dict:
    """params.yaml content over an MLflow store in `tmp`; lr=... per task key changes that task's learning rate."""
    raw = {
        "seed": 3,
        "tasks": list(TASKS),
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "artifact_location": str(tmp / "mlruns"),
                     "experiment": "tiny"},
        "digits": {"data": {"max_samples": 300}, "model": {"hidden_size": 16},
                   "train": {"max_epochs": 2, "batch_size": 32}},
        "translation": {"data": {"max_number": 200}, "model": {"hidden_size": 16, "embedding_dim": 8},
                        "train": {"max_epochs": 2, "batch_size": 32}},
        "charlm": {"data": {"max_chars": 20_000}, "model": {"hidden_size": 16, "embedding_dim": 8},
                   "train": {"max_epochs": 1, "batch_size": 16, "block_size": 32, "limit_train_batches": 5}},
    }
    for task, value in lr.items():
        raw[task]["train"]["lr"] = value
    return raw
