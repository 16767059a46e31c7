"""The evaluate stage: its metrics against hand-checked cases and independent recomputations, the files it
writes per topology, and a failure part-way that leaves nothing behind.

Tiny digits, translation and charlm models are prepared and trained once for the module (untracked: the
MLflow side of evaluation is tests/test_tracking.py's); every output goes under pytest's temporary folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import TASKS, tiny_raw_params

from pipeline import evaluate as ev
from pipeline import gates
from pipeline.config import parse_params
from pipeline.datasets.datamodule import PreparedDataModule
from pipeline.datasets.prepared import Prepared, load_manifest, save_prepared
from pipeline.models import evaluation
from pipeline.models.saved import load_trained
from pipeline.tasks import get_task
from pipeline.topologies import get_topology

PRIMES = ("ROMEO:", "First Citizen:\n", "The king")  # what evaluate samples the char LM from
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pipeline.prepare import prepare
    from pipeline.train import train

    tmp = tmp_path_factory.mktemp("evaluate")
    params = parse_params(tiny_raw_params(tmp))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for task in TASKS:
            prepare(task, params, tmp / "data")
            train(task, params, data_root=tmp / "data", models_root=tmp / "models", ckpt_root=tmp / "ckpt",
                  track=False, root=tmp)
    return SimpleNamespace(root=tmp, params=params, data=tmp / "data", models=tmp / "models")


def outputs(tmp_path: Path) -> dict:
    return {"metrics_root": tmp_path / "metrics", "plots_root": tmp_path / "plots",
            "samples_root": tmp_path / "samples", "figures_root": tmp_path / "figures"}


def run_evaluate(trained, task: str, tmp_path: Path) -> str:
    return ev.evaluate(task, trained.params, data_root=trained.data, models_root=trained.models, track=False,
                       root=trained.root, **outputs(tmp_path))


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC and matplotlib.image.imread(path).ndim == 3


def hand_prepared(tmp_path: Path, splits: dict, vocab: dict, batch_size: int = 4) -> PreparedDataModule:
    save_prepared(Prepared(splits=splits, vocab=vocab, source={"package": "hand-made"}), tmp_path / "hand")
    return PreparedDataModule(tmp_path / "hand", batch_size, seed=0)


# --- helpers and evaluators on hand-checked cases ----------------------------------------------------


def test_unigram_nll_by_hand():
    # add-one counts over a vocabulary of 3: token 0 seen twice, 1 once, 2 never -> 3, 2, 1 of 6
    train_ids, test_ids = np.array([0, 0, 1]), np.array([0, 2])
    assert evaluation.unigram_nll(train_ids, test_ids, 3) == pytest.approx(-(math.log(3 / 6) + math.log(1 / 6)) / 2)
    assert evaluation.unigram_nll(train_ids, np.array([1]), 3) == pytest.approx(math.log(3))
    # a uniform training text gives the uniform model: ln V nats per token, whatever the test text
    assert evaluation.unigram_nll(np.arange(5).repeat(4), np.array([4, 4, 1]), 5) == pytest.approx(math.log(5))


def test_classify_metrics_from_fixed_logits(tmp_path, monkeypatch):
    from pipeline.models.one_to_one import OneToOne

    # x[:, 0] is the class the model is made to predict; 6 test samples in batches of 4 (two batches)
    preds, target = [0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2]
    splits = {"train": {"x": np.zeros((5, 2), np.float32), "y": np.array([2, 2, 2, 0, 1])},
              "val": {"x": np.zeros((1, 2), np.float32), "y": np.array([0])},
              "test": {"x": np.array([[p, 0] for p in preds], np.float32), "y": np.array(target)}}
    dm = hand_prepared(tmp_path, splits, {"labels": ["a", "b", "c"]})
    model = OneToOne(vocab=dm.vocab, dims={"input_shape": [2]}, model={"hidden_size": 4}, train={})
    monkeypatch.setattr(model, "forward", lambda x: 10.0 * F.one_hot(x[:, 0].long(), 3).float())
    monkeypatch.setattr(evaluation, "BATCH", 4)
    (tmp_path / "out").mkdir()
    metrics, baseline = get_topology("one_to_one").evaluate(model, dm, "test", tmp_path / "out", tmp_path)
    # per class (precision, recall) = a (1/2, 1/2), b (2/3, 1), c (1, 1/2) -> F1 1/2, 4/5, 2/3
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["f1_macro"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert baseline == {"name": "majority class", "accuracy": pytest.approx(2 / 6)}  # train majority: c
    assert is_png(tmp_path / "out" / "confusion.png")
    # DVC's confusion template counts rows: one (actual, predicted) row per test sample, in label names
    rows = json.loads((tmp_path / "out" / "confusion.json").read_text())
    assert rows == [{"actual": "abc"[t], "predicted": "abc"[p]} for t, p in zip(target, preds)]


def test_per_step_metrics_skip_padding(tmp_path, monkeypatch):
    from pipeline.models.many_to_many import ManyToMany

    # streams of 4 and 2 real steps: the padded steps are predicted wrong and must not count anywhere
    y = np.array([[1, 2, 1, 0], [1, 2, 0, 0]])
    preds = np.array([[1, 2, 2, 0], [1, 1, 2, 2]])
    test = {"x": preds[..., None].astype(np.float32), "y": y, "lengths": np.array([4, 2])}
    # real training labels b b b: majority b (with its padding counted, a would be: 5 of 8)
    train = {"x": np.zeros((2, 4, 1), np.float32), "y": np.array([[1, 1, 0, 0], [1, 0, 0, 0]]),
             "lengths": np.array([2, 1])}
    dm = hand_prepared(tmp_path, {"train": train, "val": test, "test": test}, {"labels": ["a", "b", "c"]})
    model = ManyToMany(vocab=dm.vocab, dims={"input_shape": [4, 1]}, model={"hidden_size": 4}, train={})
    monkeypatch.setattr(model, "forward", lambda x, lengths=None: 10.0 * F.one_hot(x[..., 0].long(), 3).float())
    (tmp_path / "out").mkdir()
    metrics, baseline = get_topology("many_to_many").evaluate(model, dm, "test", tmp_path / "out", tmp_path)
    # real steps: targets b c b a b c, predictions b c c a b b -> F1 a 1, b 2/3, c 1/2
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["f1_macro"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert baseline["accuracy"] == pytest.approx(3 / 6)  # b on the real test steps
    rows = json.loads((tmp_path / "out" / "confusion.json").read_text())  # real steps only: no padding rows
    assert [(r["actual"], r["predicted"]) for r in rows] == list(zip("bcbabc", "bccabb"))


class ScriptedTranslator:
    """Answers the reference for sources whose test row index is in `right`, and `wrong` otherwise."""

    def __init__(self, arrays: dict, right: set[int], wrong: list[int]):
        self.rows = {tuple(src[:n].tolist()): i for i, (src, n) in enumerate(zip(arrays["src"], arrays["src_lengths"]))}
        self.refs = [tgt[1 : m - 1].tolist() for tgt, m in zip(arrays["tgt"], arrays["tgt_lengths"])]
        self.right, self.wrong = right, wrong

    def greedy(self, src, src_lengths):
        rows = [self.rows[tuple(s[: int(n)].tolist())] for s, n in zip(src, src_lengths)]
        return [self.refs[i] if i in self.right else self.wrong for i in rows]


def read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_translate_exact_match_and_bleu_on_scripted_outputs(trained, tmp_path, monkeypatch):
    from num2words import num2words

    dm = PreparedDataModule(trained.data / "translation", 32, seed=0)
    test = dm.split("test")
    n = len(test["src"])
    monkeypatch.setattr(evaluation, "BATCH", 7)  # several batches
    for right, expect in ((set(range(n)), 1.0), (set(range(0, n, 3)), len(range(0, n, 3)) / n), (set(), 0.0)):
        samples = tmp_path / f"samples{len(right)}"
        samples.mkdir()
        model = ScriptedTranslator(test, right, wrong=[])
        metrics, baseline = get_topology("seq2seq").evaluate(model, dm, "test", tmp_path, samples)
        assert metrics["exact_match"] == pytest.approx(expect)
        rows = read_tsv(samples / "translations.tsv")
        assert rows[0] == ["source", "reference", "model", "match"] and len(rows) == n + 1
        for k, (source, reference, hyp, match) in enumerate(rows[1:]):  # the loader keeps the split's order
            number = int(test["numbers"][k])
            assert source == num2words(number) and reference == num2words(number, lang="fr")
            assert hyp == (reference if k in right else "") and match == str(k in right)
        if expect == 1.0:
            assert metrics["bleu"] == pytest.approx(1.0)
        if expect == 0.0:
            assert metrics["bleu"] == 0.0
        assert 0.0 <= baseline["exact_match"] <= 1.0 and baseline["name"] == "most frequent training translation"


# --- evaluate() on trained tiny models ---------------------------------------------------------------


def check_gate_files(saturation: Path, samples: Path, model) -> None:
    figures = saturation.parent.parent.parent / "figures" / saturation.stem
    assert is_png(figures / "gate_saturation.png") and is_png(figures / "gate_heatmaps.png")
    rows = json.loads(saturation.read_text())
    lstm = model.lstm
    assert len(rows) == len(gates.SATURATION_GATES) * lstm.num_layers * lstm.hidden_size
    assert {r["gate"] for r in rows} == set(gates.SATURATION_GATES)
    for r in rows:
        assert set(r) == {"gate", "layer", "unit", "left", "right"}
        assert 0 <= r["layer"] < lstm.num_layers and 0 <= r["unit"] < lstm.hidden_size
        assert 0.0 <= r["left"] and 0.0 <= r["right"] and r["left"] + r["right"] <= 1.0 + 1e-9
    stats = json.loads((samples / "gate_saturation.json").read_text())
    assert gates.saturation_plot_data(stats) == rows


def macro_f1(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    scores = []
    for c in range(k):
        tp, fp, fn = ((pred == c) & (target == c)).sum(), ((pred == c) & (target != c)).sum(), \
            ((pred != c) & (target == c)).sum()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


@pytest.mark.parametrize("task", TASKS)
def test_evaluate_writes_metrics_plots_and_samples(trained, task, tmp_path):
    line = run_evaluate(trained, task, tmp_path)
    assert line.startswith(f"{task}: ") and "\n" not in line
    info = get_task(task)
    result = json.loads((tmp_path / "metrics" / f"{task}.json").read_text())
    plots, samples = tmp_path / "plots", tmp_path / "samples" / task
    about = json.loads((samples / "evaluation.json").read_text())
    # the metrics file holds numbers only (what DVC shows and diffs), the key metric first
    numbers = [v for b in (result, result["baseline"]) for v in b.values() if not isinstance(v, dict)]
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers), result
    assert next(iter(result)) == info.key_metric and result["baseline"]
    assert about["key_metric"] == info.key_metric and about["higher_is_better"] == info.higher_is_better
    assert about["baseline"] and about["trace_reconstruction_error"] < 1e-4
    # data only (pictures in figures/), a folder per kind of plot; an empty confusion for a non-classifier
    assert sorted(p.relative_to(plots).as_posix() for p in plots.rglob("*") if p.is_file()) == [
        f"confusion/{task}.json", f"saturation/{task}.json"]
    if task != "digits":
        assert json.loads((plots / "confusion" / f"{task}.json").read_text()) == []
    model, _ = load_trained(trained.models / task)
    check_gate_files(plots / "saturation" / f"{task}.json", samples, model)
    dm = PreparedDataModule(trained.data / task, 32, seed=0, block_size=32)
    counts = load_manifest(trained.data / task)["counts"]

    if task == "digits":
        assert about["split"] == "test" and about["samples"] == counts["test"]
        test, train_y = dm.split("test"), dm.split("train")["y"]
        with torch.no_grad():
            pred = model(torch.from_numpy(test["x"])).argmax(-1).numpy()
        assert result["accuracy"] == pytest.approx((pred == test["y"]).mean(), abs=1e-6)
        assert result["f1_macro"] == pytest.approx(macro_f1(pred, test["y"], 10), abs=1e-6)
        majority = np.bincount(train_y).argmax()
        assert result["baseline"]["accuracy"] == pytest.approx((test["y"] == majority).mean(), abs=1e-6)
        assert is_png(tmp_path / "figures" / task / "confusion.png")
        confusion = json.loads((plots / "confusion" / f"{task}.json").read_text())
        labels = dm.vocab["labels"]
        assert [(r["actual"], r["predicted"]) for r in confusion] == [(labels[t], labels[p])
                                                                       for t, p in zip(test["y"], pred)]
    elif task == "translation":
        assert about["split"] == "test" and about["samples"] == counts["test"] <= 200
        assert 0.0 <= result["bleu"] <= 1.0
        rows = read_tsv(samples / "translations.tsv")[1:]
        assert len(rows) == counts["test"]
        assert all(match == str(ref == hyp) for _, ref, hyp, match in rows)
        assert result["exact_match"] == pytest.approx(np.mean([m == "True" for *_, m in rows]), abs=1e-6)
    else:
        val = dm.split("val")
        assert about["split"] == "val" and about["samples"] == len(val["x"]) == (counts["val"] - 1) // 32
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(val["x"]))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(val["y"]).reshape(-1))
        assert result["loss"] == pytest.approx(float(loss), abs=1e-5)
        assert result["bits_per_char"] == pytest.approx(result["loss"] / math.log(2), abs=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-5)
        ids = {s: np.load(trained.data / task / f"{s}.npz")["ids"] for s in ("train", "val")}
        counts_1 = np.bincount(ids["train"], minlength=len(dm.vocab["chars"])) + 1
        unigram = -np.log(counts_1 / counts_1.sum())[ids["val"]].mean()
        assert result["baseline"]["loss"] == pytest.approx(unigram, abs=1e-5)
        text = (samples / "samples.txt").read_text()
        for prime in PRIMES:
            header = f"--- prime {prime!r}, temperature 0.5\n"
            assert header in text and text.split(header, 1)[1].startswith(prime)
    names = {"digits": {"accuracy", "f1_macro"}, "translation": {"exact_match", "bleu"},
             "charlm": {"loss", "bits_per_char", "perplexity"}}[task]
    assert names <= set(result) and info.key_metric in names


# --- failure part-way ---------------------------------------------------------------------------------


def boom(*args, **kwargs):
    raise RuntimeError("plotting failed (simulated)")


def test_failed_evaluation_leaves_nothing(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(gates, "plot_heatmaps", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        run_evaluate(trained, "digits", tmp_path)
    assert not (tmp_path / "metrics" / "digits.json").exists()
    for root in ("plots", "figures", "samples"):  # not even a temporary folder
        assert not (tmp_path / root).exists() or list((tmp_path / root).iterdir()) == []
    assert not (tmp_path / "metrics").exists() or list((tmp_path / "metrics").iterdir()) == []


def test_failed_evaluation_keeps_the_previous_one(trained, tmp_path, monkeypatch):
    run_evaluate(trained, "digits", tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(gates, "plot_saturation", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        run_evaluate(trained, "digits", tmp_path)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["confusion", "saturation"]
