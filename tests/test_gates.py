"""Gate statistics and pictures: saturation against a hand-built GateTrace, and the plots' PNGs."""

import json

import numpy as np
import pytest
import torch

from pipeline.gates import SATURATION_GATES, plot_heatmaps, plot_saturation, saturation, saturation_plot_data
from pipeline.lstm import GateLSTM, GateTrace, VanillaRNN

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def hand_trace(pad_value: float = NAN) -> GateTrace:
    """2 layers, 2 sequences (lengths 4 and 2), 4 steps, 3 units; padded steps hold `pad_value`."""
    L, B, T, H = 2, 2, 4, 3
    full = lambda v: torch.full((L, B, T, H), v, dtype=torch.float64)  # noqa: E731
    trace = GateTrace(input_gate=full(0.05), forget_gate=full(0.5), candidate=full(-0.99), output_gate=full(0.5),
                      cell=full(0.3), hidden=full(0.1), mask=torch.tensor([[True] * 4, [True, True, False, False]]))
    f = trace.forget_gate[0]  # layer 0, (B, T, H)
    f[0, :, 0] = 0.95  # unit 0: always right-saturated -> long memory
    f[1, :2, 0] = 0.95
    f[0, :, 1] = torch.tensor([0.05, 0.5, 0.95, 0.5])  # unit 1: 3 of 6 real steps left, 1 right
    f[1, :2, 1] = 0.05
    f[1, 1, 2] = 0.92  # unit 2: 1 of 6 right
    trace.output_gate[0, 0, 0, 0] = 0.1  # exactly on a threshold: not saturated (strict)
    trace.output_gate[0, 0, 1, 0] = 0.9
    for _, value in trace.items():
        value.masked_fill_(~trace.mask[None, :, :, None], pad_value)
    return trace


def test_saturation_fractions_by_hand():
    stats = saturation(hand_trace())
    assert stats["real_steps"] == 6
    assert stats["thresholds"] == {"low": 0.1, "high": 0.9, "long_memory": 0.9}
    assert len(stats["layers"]) == 2
    assert set(stats["layers"][0]) == set(SATURATION_GATES)  # the tanh candidate is not counted
    f0 = stats["layers"][0]["forget_gate"]
    np.testing.assert_allclose(f0["left"], [0, 3 / 6, 0])
    np.testing.assert_allclose(f0["right"], [1, 1 / 6, 1 / 6])
    np.testing.assert_allclose(stats["layers"][0]["input_gate"]["left"], [1, 1, 1])
    np.testing.assert_allclose(stats["layers"][0]["output_gate"]["left"], [0, 0, 0])  # 0.1 is not < 0.1
    np.testing.assert_allclose(stats["layers"][0]["output_gate"]["right"], [0, 0, 0])  # 0.9 is not > 0.9
    np.testing.assert_allclose(stats["layers"][1]["forget_gate"]["left"], [0, 0, 0])
    summary = stats["summary"]
    assert summary["long_memory_units"] == [{"layer": 0, "unit": 0, "right": 1.0}]
    assert summary["mean"]["forget_gate"]["left"] == pytest.approx((3 / 6) / 6)  # 6 units over 2 layers
    assert summary["mean"]["forget_gate"]["right"] == pytest.approx((1 + 1 / 6 + 1 / 6) / 6)
    assert summary["mean"]["input_gate"] == {"left": 1.0, "right": 0.0}
    assert json.loads(json.dumps(stats)) == stats


def test_padded_steps_are_ignored_whatever_they_hold():
    base = saturation(hand_trace())
    assert saturation(hand_trace(pad_value=0.99)) == base  # mask decides, not NaN
    assert saturation(hand_trace(pad_value=0.01)) == base


def test_thresholds_and_errors():
    wide = saturation(hand_trace(), low=0.6, high=0.94)
    np.testing.assert_allclose(wide["layers"][0]["forget_gate"]["left"], [0, 5 / 6, 5 / 6])
    np.testing.assert_allclose(wide["layers"][0]["forget_gate"]["right"], [1, 1 / 6, 0])
    with pytest.raises(ValueError, match="low < high"):
        saturation(hand_trace(), low=0.9, high=0.1)
    rnn_trace = VanillaRNN(2, 3, batch_first=True)(torch.randn(2, 5, 2), return_gates=True)[2]
    with pytest.raises(ValueError, match="VanillaRNN"):
        saturation(rnn_trace)


def test_saturation_of_a_real_trace_matches_brute_force():
    torch.manual_seed(0)
    lstm = GateLSTM(4, 6, num_layers=2, batch_first=True)
    with torch.no_grad():
        lstm.weight_hh_l0.mul_(8)  # push gates towards saturation so the counts are not all zero
    lengths = torch.tensor([9, 3, 6])
    _, _, trace = lstm(torch.randn(3, 9, 4) * 3, lengths=lengths, return_gates=True)
    stats = saturation(trace)
    assert stats["real_steps"] == int(lengths.sum())
    for k in range(2):
        for gate in SATURATION_GATES:
            real = np.concatenate([getattr(trace, gate)[k, b, :n].numpy() for b, n in enumerate(lengths.tolist())])
            assert not np.isnan(real).any()
            np.testing.assert_allclose(stats["layers"][k][gate]["left"], (real < 0.1).mean(0), atol=1e-12)
            np.testing.assert_allclose(stats["layers"][k][gate]["right"], (real > 0.9).mean(0), atol=1e-12)
    total = sum(sum(stats["layers"][k][g]["left"]) + sum(stats["layers"][k][g]["right"])
                for k in range(2) for g in SATURATION_GATES)
    assert total > 0


def test_saturation_plot_data_rows():
    rows = saturation_plot_data(saturation(hand_trace()))
    assert len(rows) == 2 * 3 * 3  # layers x gates x units
    assert set(rows[0]) == {"gate", "layer", "unit", "left", "right"}
    row = next(r for r in rows if r["gate"] == "forget_gate" and r["layer"] == 0 and r["unit"] == 1)
    assert row["left"] == pytest.approx(0.5) and row["right"] == pytest.approx(1 / 6)
    json.dumps(rows)


def _is_png(path):
    return path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_saturation_writes_png(tmp_path):
    stats = saturation(hand_trace())
    fig = plot_saturation(stats, tmp_path / "sub" / "saturation.png")
    assert _is_png(tmp_path / "sub" / "saturation.png")
    assert [ax.get_title() for ax in fig.axes] == ["input gate i", "forget gate f", "output gate o"]
    for ax, gate in zip(fig.axes, SATURATION_GATES):
        assert len(ax.collections) == 2  # one scatter per layer
        for k, points in enumerate(ax.collections):
            expected = np.column_stack([stats["layers"][k][gate]["left"], stats["layers"][k][gate]["right"]])
            np.testing.assert_allclose(points.get_offsets(), expected)
        triangle = ax.lines[0].get_xydata()
        np.testing.assert_allclose(triangle, [[0, 0], [1, 0], [0, 1], [0, 0]])


def test_plot_heatmaps_only_real_steps_with_labels(tmp_path):
    trace = hand_trace()
    fig = plot_heatmaps(trace, tmp_path / "heat.png", batch_index=1, labels=["a", " "], layer=0, max_units=2)
    assert _is_png(tmp_path / "heat.png")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 5  # four gates and tanh(cell); the rest of fig.axes are colour bars
    for ax in panels:
        assert ax.images[0].get_array().shape == (2, 2)  # (units shown, real steps of sequence 1)
        assert not np.isnan(np.asarray(ax.images[0].get_array())).any()
    np.testing.assert_allclose(panels[1].images[0].get_array()[:, 1], [0.95, 0.05])  # forget gate, step 1
    np.testing.assert_allclose(panels[4].images[0].get_array(), np.tanh(0.3), rtol=1e-6)  # tanh(cell)
    assert [t.get_text() for t in panels[-1].get_xticklabels()] == ["a", "\u2423"]
    with pytest.raises(ValueError, match="2 real steps"):
        plot_heatmaps(trace, tmp_path / "bad.png", batch_index=1, labels=list("abcd"))
    assert not (tmp_path / "bad.png").exists()


def test_plot_heatmaps_of_a_vanilla_rnn_trace(tmp_path):
    rnn = VanillaRNN(2, 5, batch_first=True)
    _, _, trace = rnn(torch.randn(2, 7, 2), lengths=torch.tensor([7, 4]), return_gates=True)
    fig = plot_heatmaps(trace, tmp_path / "rnn.png", batch_index=1)
    assert _is_png(tmp_path / "rnn.png")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 1 and panels[0].images[0].get_array().shape == (5, 4)
