"""The long-range experiment: the generator hides the answer in the first token only; runs write atomically."""

import json
import math

import pytest
import torch

from pipeline import longrange
from pipeline.config import LongRangeConfig, Params
from pipeline.longrange import (
    NUM_DISTRACTORS,
    LongRangeClassifier,
    accuracy,
    make_longrange,
    run_longrange,
    train_core,
)
from pipeline.lstm import GateLSTM, VanillaRNN

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILES = {"metrics.json", "results.json", "accuracy.json", "accuracy.png", "forget_gate.png"}


def test_generator_layout():
    V, D, gap = 5, 4, 7
    x, y = make_longrange(300, gap, V, seed=3, num_distractors=D)
    assert x.shape == (300, gap + 2) and y.shape == (300,)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(y, x[:, 0])
    assert ((y >= 0) & (y < V)).all()
    middle = x[:, 1:-1]
    assert ((middle >= V) & (middle < V + D)).all()  # the answer appears nowhere but position 0
    assert (x[:, -1] == V + D).all()  # one query token
    assert set(y.tolist()) == set(range(V)) and set(middle.flatten().tolist()) == set(range(V, V + D))
    x2, y2 = make_longrange(300, gap, V, seed=3, num_distractors=D)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(make_longrange(300, gap, V, seed=4, num_distractors=D)[0], x)
    assert make_longrange(4, 0, V, seed=0)[0].shape == (4, 2)
    with pytest.raises(ValueError):
        make_longrange(0, 5, V, seed=0)
    with pytest.raises(ValueError):
        make_longrange(10, 5, 1, seed=0)


def test_label_depends_on_the_first_token_only():
    V, gap = 8, 30
    x, y = make_longrange(4000, gap, V, seed=0)
    gen = torch.Generator().manual_seed(1)
    shuffled = x.clone()
    shuffled[:, 1:-1] = x[:, 1:-1][:, torch.randperm(gap, generator=gen)]
    replaced = x.clone()
    replaced[:, 1:-1] = torch.randint(V, V + NUM_DISTRACTORS, (len(x), gap), generator=gen)
    for variant in (shuffled, replaced):
        assert torch.equal(variant[:, 0], y)  # the generator's rule still gives the same labels
    # and the distractors carry no information: the best per-label distractor histogram is at chance
    counts = torch.nn.functional.one_hot(x[:, 1:-1] - V, NUM_DISTRACTORS).sum(1).double()
    train, test = slice(0, 2000), slice(2000, 4000)
    centroids = torch.stack([counts[train][y[train] == k].mean(0) for k in range(V)])
    guess = torch.cdist(counts[test], centroids).argmin(1)
    assert (guess == y[test]).double().mean() < 1 / V + 0.05


def test_classifier_init():
    torch.manual_seed(0)
    H = 6
    chrono = LongRangeClassifier("lstm", 4, H, chrono_tmax=50)
    assert isinstance(chrono.core, GateLSTM)
    b_f, b_i = chrono.core.bias_ih_l0[H : 2 * H], chrono.core.bias_ih_l0[:H]
    assert ((b_f >= 0) & (b_f <= math.log(49))).all()
    assert torch.equal(b_i, -b_f)
    assert (chrono.core.bias_hh_l0[: 2 * H] == 0).all()
    classic = LongRangeClassifier("lstm", 4, H, chrono_tmax=None, forget_bias=1.0)
    assert (classic.core.bias_ih_l0[H : 2 * H] == 1).all() and (classic.core.bias_hh_l0[H : 2 * H] == 0).all()
    rnn = LongRangeClassifier("rnn", 4, H)
    assert isinstance(rnn.core, VanillaRNN)
    bound = 1 / math.sqrt(H)  # nn.RNN's standard init, untouched
    assert all(p.abs().max() <= bound for p in rnn.core.parameters())
    x, _ = make_longrange(3, 5, 4, seed=0)
    logits, trace = chrono(x, return_gates=True)
    assert logits.shape == (3, 4) and trace.forget_gate.shape == (1, 3, 7, H)
    assert rnn(x).shape == (3, 4)
    with pytest.raises(ValueError):
        LongRangeClassifier("gru", 4, H)


def test_lstm_learns_a_short_gap():
    cfg = LongRangeConfig(gaps=[3], vocab_size=4, train_samples=256, test_samples=200, hidden_size=16,
                          batch_size=32, max_epochs=6, lr=0.01)
    model, losses = train_core("lstm", 3, cfg, seed=0)
    assert len(losses) == 6 and losses[-1] < losses[0]
    x, y = make_longrange(200, 3, 4, seed=99)
    assert accuracy(model, x, y) > 0.9


def tiny_params(**overrides) -> Params:
    cfg = dict(gaps=[2, 4], vocab_size=3, train_samples=64, test_samples=40, hidden_size=8, batch_size=32,
               max_epochs=2, lr=0.01)
    return Params(seed=0, longrange=LongRangeConfig(**{**cfg, **overrides}))


def test_tiny_run_writes_every_file(tmp_path):
    out = tmp_path / "longrange"
    threads = torch.get_num_threads()
    summary = run_longrange(tiny_params(), out)
    assert torch.get_num_threads() == threads
    assert "\n" not in summary and "LSTM" in summary and "RNN" in summary
    assert {p.name for p in out.iterdir()} == FILES
    assert [p.name for p in tmp_path.iterdir()] == ["longrange"]  # no temp folder left beside it
    results = json.loads((out / "results.json").read_text())
    assert {"gaps", "lstm", "rnn", "chance", "timings", "train_loss", "probe"} <= set(results)
    assert results["gaps"] == [2, 4] and results["chance"] == pytest.approx(1 / 3)
    assert len(results["lstm"]) == len(results["rnn"]) == 2
    assert all(0 <= a <= 1 for a in results["lstm"] + results["rnn"])
    assert len(results["timings"]["lstm"]) == 2 and results["timings"]["total_s"] > 0
    assert results["probe"]["gap"] == 4 and results["probe"]["carrier_units"]
    assert results["probe"]["reconstruction_error"] < 1e-4
    metrics = json.loads((out / "metrics.json").read_text())  # numbers only, as DVC shows them
    assert list(metrics["lstm"]) == ["gap_4", "gap_2"] and metrics["carrier_units"] >= 1
    for core in ("lstm", "rnn"):
        assert [metrics[core][f"gap_{g}"] for g in (2, 4)] == pytest.approx(results[core], abs=1e-6)
    assert metrics["chance"] == pytest.approx(1 / 3, abs=1e-6)
    rows = json.loads((out / "accuracy.json").read_text())
    assert len(rows) == 4 and set(rows[0]) == {"gap", "core", "accuracy"}
    assert {(r["gap"], r["core"]) for r in rows} == {(2, "lstm"), (4, "lstm"), (2, "rnn"), (4, "rnn")}
    for png in ("accuracy.png", "forget_gate.png"):
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE


def test_rerun_replaces_and_failure_leaves_previous_results(tmp_path, monkeypatch):
    out = tmp_path / "longrange"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    run_longrange(tiny_params(gaps=[2]), out)
    assert {p.name for p in out.iterdir()} == FILES  # replaced as a whole: the stale file is gone
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(longrange, "plot_forget_gate", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        run_longrange(tiny_params(gaps=[3]), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["longrange"]
    fresh = tmp_path / "never"
    with pytest.raises(RuntimeError):
        run_longrange(tiny_params(gaps=[2]), fresh)
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["longrange"]
