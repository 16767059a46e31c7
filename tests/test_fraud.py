"""fraud: the river Shuttle builder, the detection metrics and baselines, and a tiny model that learns (seconds)."""

from __future__ import annotations

import importlib.util
from functools import cache

import numpy as np
import pytest
import torch

from pipeline.config import PipelineError
from pipeline.datasets import fraud
from pipeline.datasets.fraud import FraudData
from pipeline.datasets.prepared import save_prepared
from pipeline.models.detection import FRAUD, binary_scores, detect, logistic_regression

SMALL = FraudData(max_rows=4000)
SEED = 7
FEATURES = [f"f{i}" for i in range(1, 10)]


@cache
def built(seed: int = SEED, cfg: FraudData = SMALL):
    return fraud.build(cfg, seed)


def rows(array: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in array}


def test_rows_match_rivers_own_reader():
    """Our file reader against river.datasets.Shuttle (the package's documented reader)."""
    from river.datasets import Shuttle

    names, x, y = fraud.read_rows()
    assert names == FEATURES and x.shape == (49_097, 9) and y.shape == (49_097,)
    assert int(y.sum()) == 3_511
    for i, (features, label) in enumerate(Shuttle()):
        assert [features[n] for n in names] == x[i].tolist() and int(label) == y[i]
        if i == 999:
            break


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    first = save_prepared(built(), tmp_path / "a")
    second = save_prepared(fraud.build(SMALL, SEED), tmp_path / "b")
    assert first["content_sha256"] == second["content_sha256"]
    for name in ("train.npz", "val.npz", "test.npz", "vocab.json", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert save_prepared(built(SEED + 1), tmp_path / "c")["content_sha256"] != first["content_sha256"]
    assert first["source"]["package"] == "river" and first["source"]["version"] == "0.26.1"
    assert "BSD-3-Clause" in first["source"]["license"]


def test_splits_are_disjoint_stratified_and_standardized_on_train():
    data = built()
    counts = {s: len(a["y"]) for s, a in data.splits.items()}
    assert counts == {"train": 2800, "val": 400, "test": 800}
    for split, a in data.splits.items():
        assert a["x"].shape == (counts[split], 9) and a["x"].dtype == np.float32 and a["y"].dtype == np.int64
        assert set(np.unique(a["y"])) == {0, 1}
        assert abs(a["y"].mean() - 0.0715) < 0.01  # stratified: every split near the file's 7.15%
    train = data.splits["train"]["x"].astype(np.float64)
    assert np.allclose(train.mean(0), 0, atol=1e-5) and np.allclose(train.std(0), 1, atol=1e-4)
    seen = rows(data.splits["train"]["x"])
    assert not seen & rows(data.splits["val"]["x"]) and not seen & rows(data.splits["test"]["x"])
    assert not rows(data.splits["val"]["x"]) & rows(data.splits["test"]["x"])
    assert data.vocab["labels"] == ["normal", "anomaly"] and data.vocab["features"] == FEATURES
    # the stored statistics undo the scaling: raw rows of the file come back
    names, x, y = fraud.read_rows()
    raw = data.splits["test"]["x"].astype(np.float64) * data.vocab["std"] + data.vocab["mean"]
    assert rows(np.round(raw) + 0.0) <= rows(x)  # + 0.0: -0.0 -> 0.0


def test_example_is_raw_named_rows_of_both_classes():
    frame = fraud.example()
    assert list(frame.columns) == FEATURES and len(frame) == 2
    names, x, y = fraud.read_rows()
    where = [int(np.flatnonzero((x == row).all(1))[0]) for row in frame.to_numpy()]
    assert sorted(y[where].tolist()) == [0, 1]


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "river" else real(name, *a))
    with pytest.raises(PipelineError, match="not installed: pip install river==0.26.1"):
        fraud.build(SMALL, SEED)


# --- metrics, baselines, a tiny model --------------------------------------------------------------


def test_binary_scores_against_scikit_learn():
    from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.1).astype(np.int64)
    p = np.clip(0.3 * y + rng.random(500) * 0.7, 0, 1).astype(np.float32)
    ours = binary_scores(p, y)
    assert ours["average_precision"] == pytest.approx(average_precision_score(y, p), abs=1e-5)
    assert ours["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-5)
    assert ours["f1"] == pytest.approx(f1_score(y, p >= 0.5), abs=1e-5)
    assert ours["precision"] == pytest.approx(precision_score(y, p >= 0.5), abs=1e-5)
    assert ours["recall"] == pytest.approx(recall_score(y, p >= 0.5), abs=1e-5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("fraud")
    save_prepared(built(), out)
    return out


def test_a_tiny_model_learns_and_the_evaluator_reports(prepared, tmp_path):
    """A second of training ranks anomalies far above chance; the evaluator's files agree with its numbers."""
    from pipeline.datasets.datamodule import PreparedDataModule
    from pipeline.models.one_to_one import OneToOne

    dm = PreparedDataModule(prepared, 128, SEED)
    torch.manual_seed(0)
    model = OneToOne(vocab=dm.vocab, dims=dm.dims(), model={"hidden_size": 16}, train={"lr": 0.02})
    assert dm.dims() == {"input_shape": [9]}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for epoch in range(6):
        for batch in dm.loader("train", shuffle=True, drop_last=True, epoch_of=lambda e=epoch: e):
            total, count = model.loss_terms(batch)
            optimizer.zero_grad()
            (total / count).backward()
            optimizer.step()
    model.eval()
    out, samples = tmp_path / "plots", tmp_path / "samples"
    out.mkdir()
    samples.mkdir()
    metrics, baseline = detect(model, dm, "test", out, samples)
    test = dm.split("test")
    assert baseline["majority_average_precision"] == pytest.approx(test["y"].mean())
    assert metrics["average_precision"] > 0.9 > 3 * baseline["majority_average_precision"]
    assert 0.5 < metrics["f1"] <= 1
    lr = logistic_regression(dm.split("train"), test)
    assert baseline["average_precision"] == pytest.approx(binary_scores(lr, test["y"])["average_precision"])
    import json

    confusion = json.loads((out / "confusion.json").read_text())
    assert len(confusion) == len(test["y"])
    assert sum(r["actual"] == "anomaly" for r in confusion) == int(test["y"].sum())
    hits = sum(r["actual"] == r["predicted"] for r in confusion) / len(confusion)
    assert hits == pytest.approx(metrics["accuracy"])
    curve = json.loads((samples / "pr_curve.json").read_text())
    assert {r["model"] for r in curve} == {"GateLSTM", "logistic regression"}
    assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 for r in curve)
    assert (out / "confusion.png").stat().st_size and (out / "pr_curve.png").stat().st_size
    suspicious = (samples / "most_suspicious.tsv").read_text().splitlines()
    assert suspicious[0].split("\t") == ["probability", "actual", *FEATURES] and len(suspicious) == 51
    probabilities = [float(line.split("\t")[0]) for line in suspicious[1:]]
    assert probabilities == sorted(probabilities, reverse=True)


def test_the_served_model_takes_named_raw_rows():
    from pipeline.models.one_to_one import OneToOne
    from pipeline.pyfunc_model import RNNPyfunc
    from pipeline.serving_inputs import InputError
    from pipeline.topologies import topology_of

    vocab = built().vocab
    torch.manual_seed(0)
    model = OneToOne(vocab=vocab, dims={"input_shape": [9]}, model={"hidden_size": 8}, train={}).eval()
    served = RNNPyfunc()  # what load_context sets up from the logged artifacts
    served.info = {"task": "fraud", "topology": "one_to_one", "variant": fraud.VARIANT, "hparams": {"vocab": vocab}}
    served.model, served.vocab, served.topology = model, vocab, topology_of(served.info)
    assert served.topology is FRAUD

    def classify_rows(model, vocab, rows):
        return served.predict(None, rows)

    frame = fraud.example()
    out = classify_rows(model, vocab, frame)
    assert list(out.columns) == ["label", "probability", "probability_normal", "probability_anomaly"]
    scaled = torch.tensor(((frame.to_numpy() - vocab["mean"]) / vocab["std"]), dtype=torch.float32)
    with torch.no_grad():
        expected = torch.softmax(model(scaled), -1).numpy()
    assert np.allclose(out[["probability_normal", "probability_anomaly"]].to_numpy(), expected, atol=1e-6)
    assert np.allclose(out["probability"], expected.max(1)) and (out["label"] == np.array(vocab["labels"])[
        expected.argmax(1)]).all()
    shuffled = frame[frame.columns[::-1]]
    assert classify_rows(model, vocab, shuffled).equals(out)  # columns by name, not position
    assert classify_rows(model, vocab, frame.astype(str)).equals(out)  # CSV: numeric strings
    assert classify_rows(model, vocab, frame.to_dict("records")).equals(out)
    assert classify_rows(model, vocab, [frame.iloc[0].to_dict()]).equals(out.iloc[:1])  # one record
    assert len(classify_rows(model, vocab, frame.iloc[:0])) == 0
    for bad, message in ((frame.drop(columns="f3"), "missing column.*'f3'"),
                         (frame.assign(amount=1.0), "unknown column.*'amount'"),
                         (frame.assign(f2=[1.0, np.nan]), "row 1, column 'f2': missing"),
                         (frame.assign(f5=["x", "1"]), "row 0, column 'f5'.*string"),
                         (frame.assign(f9=[np.inf, 1.0]), "row 0, column 'f9'.*finite"),
                         ([[1, 2, 3]], "expected rows of 9 features")):
        with pytest.raises(InputError, match=message):
            classify_rows(model, vocab, bad)


def test_the_task_judges_by_average_precision():
    from pipeline.models.one_to_one import OneToOneTopology
    from pipeline.tasks import get_task

    task = get_task("fraud")
    assert task.topology is FRAUD and isinstance(FRAUD, OneToOneTopology) and task.topology_name == "one_to_one"
    assert task.key_metric == "average_precision" and task.higher_is_better and task.eval_split == "test"


def test_river_is_read_not_imported():
    import subprocess
    import sys

    code = ("import sys; from pipeline.datasets import fraud; fraud.read_rows(); import pipeline.prepare;"
            "bad = {'river', 'torch', 'lightning'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
