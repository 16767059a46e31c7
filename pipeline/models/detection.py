"""Rare-event detection (the fraud task): the one_to_one topology over table rows, with the metrics fraud
teams read against honest baselines (`FRAUD`, the VARIANT that pipeline/datasets/fraud.py declares). The
model, its training and its batches are the one_to_one ones.

- average precision (PR-AUC; torchmetrics `BinaryAveragePrecision`) of the positive class's
  probability: how well the rows are ranked, independent of a threshold. It is the metric for a
  rare positive class: a detector that ranks at random scores the positive rate, not 0.5 (ROC-AUC,
  reported beside it, hides that).
- F1, precision and recall of the positive class at probability 0.5 (torchmetrics).

Baselines on the same split: the majority class (everything normal: average precision = the
positive rate, F1 0), and a scikit-learn logistic regression fitted on the same standardized
training rows (the model a fraud team would try first). The evaluator also writes the confusion
matrix (as the other classifiers), the precision-recall curves of the model and the logistic
regression (samples/<task>/pr_curve.json and figures/<task>/pr_curve.png), and the test rows the
model ranks most suspicious (samples/<task>/most_suspicious.tsv, in raw units).

Serving: rows with the named feature columns in raw units (pipeline.serving_inputs.features) ->
label, probability (of that label) and probability_<label> for each class (the score to threshold).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import serving_inputs as inputs
from pipeline.models import serving
from pipeline.models.evaluation import plot_confusion
from pipeline.models.one_to_one import OneToOneTopology

BATCH = 4096
CURVE_POINTS = 200  # points per precision-recall curve in the plot data


def binary_scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """average_precision, roc_auc, f1, precision, recall (at 0.5) of P(positive) against 0/1 labels."""
    from torchmetrics.functional.classification import (
        binary_auroc,
        binary_average_precision,
        binary_f1_score,
        binary_precision,
        binary_recall,
    )

    p, y = torch.as_tensor(probabilities, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    return {"average_precision": float(binary_average_precision(p, y)), "roc_auc": float(binary_auroc(p, y)),
            "f1": float(binary_f1_score(p, y)), "precision": float(binary_precision(p, y)),
            "recall": float(binary_recall(p, y))}


def logistic_regression(train: dict, test: dict, seed: int = 0) -> np.ndarray:
    """P(positive) of the test rows under a scikit-learn logistic regression fitted on the training rows."""
    from sklearn.linear_model import LogisticRegression

    fitted = LogisticRegression(max_iter=2000, random_state=seed).fit(train["x"], train["y"])
    return fitted.predict_proba(test["x"])[:, 1]


def pr_curve_rows(probabilities: np.ndarray, labels: np.ndarray, name: str) -> list[dict]:
    """About CURVE_POINTS {"recall", "precision", "model"} rows of the precision-recall curve."""
    from torchmetrics.functional.classification import binary_precision_recall_curve

    precision, recall, _ = binary_precision_recall_curve(torch.as_tensor(probabilities, dtype=torch.float32),
                                                         torch.as_tensor(labels, dtype=torch.long))
    keep = np.unique(np.linspace(0, len(recall) - 1, CURVE_POINTS).round().astype(int))
    return [{"recall": round(float(recall[i]), 5), "precision": round(float(precision[i]), 5), "model": name}
            for i in keep]


def _plot_pr(rows: list[dict], positive_rate: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        ax.plot([r["recall"] for r in mine], [r["precision"] for r in mine], label=name)
    ax.axhline(positive_rate, color="grey", linestyle=":", label=f"random ranking ({positive_rate:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    ax.set_title("precision-recall on the test rows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def positive_probabilities(model, x: np.ndarray) -> np.ndarray:
    """P(class 1) of each row of x (N, F) under a one_to_one classifier."""
    out = []
    with torch.no_grad():
        for start in range(0, len(x), BATCH):
            out.append(torch.softmax(model(torch.from_numpy(x[start : start + BATCH])), -1)[:, 1])
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def detect(model, dm, split: str, out: Path, samples: Path) -> tuple[dict, dict]:
    """The fraud evaluator: (metrics, baseline); writes confusion.json/.png and pr_curve.png to `out`,
    pr_curve.json and most_suspicious.tsv to `samples`."""
    labels = dm.vocab["labels"]
    test, train = dm.split(split), dm.split("train")
    p = positive_probabilities(model, test["x"])
    y = test["y"]
    metrics = binary_scores(p, y)
    predicted = (p >= 0.5).astype(np.int64)
    metrics["accuracy"] = float((predicted == y).mean())
    matrix = np.zeros((2, 2), dtype=np.int64)
    np.add.at(matrix, (y, predicted), 1)
    plot_confusion(matrix, labels, out / "confusion.png")
    (out / "confusion.json").write_text(json.dumps(
        [{"actual": labels[a], "predicted": labels[b]} for a, b in zip(y.tolist(), predicted.tolist())],
        separators=(",", ":")))
    lr = logistic_regression(train, test)
    lr_scores = binary_scores(lr, y)
    rate = float(y.mean())
    rows = pr_curve_rows(p, y, "GateLSTM") + pr_curve_rows(lr, y, "logistic regression")
    (samples / "pr_curve.json").write_text(json.dumps(rows, separators=(",", ":")))
    _plot_pr(rows, rate, out / "pr_curve.png")
    mean, std = np.asarray(dm.vocab["mean"]), np.asarray(dm.vocab["std"])
    order = np.argsort(-p, kind="stable")[:50]
    header = "\t".join(["probability", "actual", *dm.vocab["features"]])
    raw = np.round(test["x"][order].astype(np.float64) * std + mean, 4) + 0.0  # float32 noise and -0.0 gone
    lines = [header] + ["\t".join([f"{p[i]:.4f}", labels[y[i]], *(f"{v:g}" for v in row)])
                        for i, row in zip(order, raw)]
    (samples / "most_suspicious.tsv").write_text("\n".join(lines) + "\n")
    baseline = {"name": "logistic regression (scikit-learn, same standardized rows); majority class",
                "average_precision": lr_scores["average_precision"], "f1": lr_scores["f1"],
                "roc_auc": lr_scores["roc_auc"], "majority_average_precision": rate, "majority_f1": 0.0}
    return metrics, baseline


class FraudTopology(OneToOneTopology):
    """one_to_one over standardized table rows, judged as rare-event detection: average precision (higher is
    better) and F1 against the majority class and a logistic regression."""

    key_metric = "average_precision"

    def evaluate(self, model, dm, split, plots, samples):
        return detect(model, dm, split, plots, samples)

    def predict(self, pyfunc, model_input):
        vocab = pyfunc.vocab
        x = inputs.features(model_input, vocab["features"])
        x = ((x - np.asarray(vocab["mean"])) / np.asarray(vocab["std"])).astype(np.float32)
        logits = pyfunc.model(torch.from_numpy(x)) if len(x) else torch.zeros(0, len(vocab["labels"]))
        out = serving.classify(pyfunc, logits)
        probs = torch.softmax(logits, -1)
        for k, label in enumerate(vocab["labels"]):
            out[f"probability_{label}"] = pd.Series(probs[:, k].tolist(), dtype=np.float64)
        return out


FRAUD = FraudTopology()
