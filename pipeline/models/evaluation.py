"""What the topologies' evaluations share: classification metrics with a majority-class baseline and a
confusion matrix, token losses with a unigram baseline. Metrics come from torchmetrics."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

BATCH = 256  # held-out samples per forward pass


def batches(dm, split: str):
    return dm.loader(split, batch_size=BATCH)


def real_labels(arrays: dict) -> np.ndarray:
    """Every label, per-step labels only up to each sequence's length: padding is no label."""
    y = arrays["y"]
    if y.ndim == 2 and "lengths" in arrays:
        return np.concatenate([row[: int(n)] for row, n in zip(y, arrays["lengths"])])
    return y.ravel()


def classification(dm, split: str, out: Path, predict: Callable[[dict], tuple[torch.Tensor, torch.Tensor]]
                   ) -> tuple[dict, dict]:
    """Accuracy and macro F1 of `predict(batch) -> (predicted, actual)` class ids (flat, padding removed) over
    the split; the majority training class as baseline; out/confusion.json (an {"actual", "predicted"} row per
    prediction, DVC's `confusion` template) and out/confusion.png."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

    labels = dm.vocab["labels"]
    k = len(labels)
    acc, f1 = MulticlassAccuracy(k, average="micro"), MulticlassF1Score(k, average="macro")
    confusion = MulticlassConfusionMatrix(k)
    rows = []  # (actual, predicted) class ids, one per sample (or real step)
    for batch in batches(dm, split):
        preds, target = predict(batch)
        for metric in (acc, f1, confusion):
            metric.update(preds.flatten(), target.flatten())
        rows.append(torch.stack([target.flatten(), preds.flatten()], 1))
    train_y = real_labels(dm.split("train"))
    majority = Counter(train_y.tolist()).most_common(1)[0][0]
    test_y = real_labels(dm.split(split))
    plot_confusion(confusion.compute().numpy(), labels, out / "confusion.png")
    pairs = torch.cat(rows).tolist() if rows else []
    (out / "confusion.json").write_text(json.dumps(
        [{"actual": labels[a], "predicted": labels[p]} for a, p in pairs], separators=(",", ":")))
    metrics = {"accuracy": float(acc.compute()), "f1_macro": float(f1.compute())}
    baseline = {"name": "majority class", "accuracy": float((test_y == majority).mean())}
    return metrics, baseline


def unigram_nll(train_ids: np.ndarray, test_ids: np.ndarray, vocab_size: int) -> float:
    counts = np.bincount(train_ids, minlength=vocab_size) + 1.0  # add-one: no zero probabilities
    logp = np.log(counts / counts.sum())
    return float(-logp[test_ids].mean())


def token_loss(model, dm, split: str) -> float:
    """The model's mean loss per predicted token over the split."""
    total, count = 0.0, 0
    for batch in batches(dm, split):
        s, n = model.loss_terms(batch)
        total, count = total + float(s), count + int(n)
    return total / count


def plot_confusion(matrix: np.ndarray, labels: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 + 0.45 * len(labels), 1 + 0.45 * len(labels)))
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=7,
                color="white" if v > matrix.max() / 2 else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
