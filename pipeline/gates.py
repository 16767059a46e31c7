"""Statistics and pictures made from a GateTrace: saturation (Karpathy, Johnson & Fei-Fei 2015) and heat maps.

- `saturation`: per gate, layer and unit, the fraction of real steps where the gate is
  left-saturated (< low: nearly closed) or right-saturated (> high: nearly open). Only the
  three sigmoid gates are counted. The candidate g_t is a tanh in (-1, 1), not a gate: it says
  *what* to write, not *how much*, so "left/right saturated" has no meaning for it; its values
  appear in `plot_heatmaps` instead.
- A unit is "long-memory" when its forget gate is right-saturated on more than `long_memory`
  (default 0.9) of the real steps: it keeps its cell almost untouched from step to step.
- `plot_saturation`: the paper's scatter (left fraction vs right fraction, one point per unit).
- `plot_heatmaps`: the gates and tanh(cell) over one real input, LSTMVis-style (time along x,
  units along y), optionally labelled with the input's characters or tokens.
- `saturation_plot_data`: rows for a DVC scatter plot JSON file.

No Lightning, MLflow or DVC here. Figures are built as `matplotlib.figure.Figure` objects (no
pyplot figure registry, so nothing leaks between calls), saved as PNG and returned so callers
and tests can look at what was drawn.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from pipeline.lstm import GateTrace

matplotlib.use("Agg")  # headless: stages and tests run without a display

__all__ = ["SATURATION_GATES", "saturation", "plot_saturation", "plot_heatmaps", "saturation_plot_data"]

# The sigmoid gates whose saturation is counted (the tanh candidate is not a gate; see above).
SATURATION_GATES = ("input_gate", "forget_gate", "output_gate")

_SHORT = {"input_gate": "input gate i", "forget_gate": "forget gate f", "candidate": "candidate g",
          "output_gate": "output gate o", "cell": "tanh(cell c)", "hidden": "hidden h"}


def _real_values(value: Tensor, mask: Tensor) -> Tensor:
    """(L, B, T, H) -> (L, N, H): the N real steps of every sequence, in float64 on the CPU."""
    return value.detach().to("cpu", torch.float64)[:, mask.to("cpu", torch.bool)]


def saturation(trace: GateTrace, low: float = 0.1, high: float = 0.9, long_memory: float = 0.9) -> dict:
    """Fractions of real steps each unit's gates spend below `low` and above `high`.

    Only steps where `trace.mask` is True count (padded steps are NaN in the trace; a NaN on a
    real step, which should not happen, is skipped too). Returns a JSON-serialisable dict:

        {"thresholds": {"low", "high", "long_memory"},
         "real_steps": N,
         "layers": [{"input_gate": {"left": [per unit], "right": [per unit]},
                     "forget_gate": {...}, "output_gate": {...}}, ...],      # one dict per layer
         "summary": {"mean": {gate: {"left", "right"}},                      # over every unit of every layer
                     "long_memory_units": [{"layer", "unit", "right"}, ...], # forget right-saturated > long_memory
                     "long_memory_rule": "..."}}
    """
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    if not 0.0 <= long_memory <= 1.0:
        raise ValueError(f"long_memory must be a fraction in [0, 1], got {long_memory}")
    missing = [g for g in SATURATION_GATES if getattr(trace, g) is None]
    if missing:
        raise ValueError(f"the trace has no {', '.join(missing)} (a VanillaRNN trace has hidden states only)")
    real_steps = int(trace.mask.sum())
    if real_steps == 0:
        raise ValueError("the trace has no real steps (mask is all False)")

    per_gate = {}
    for gate in SATURATION_GATES:
        values = _real_values(getattr(trace, gate), trace.mask)  # (L, N, H)
        finite = ~torch.isnan(values)
        counted = finite.sum(1).clamp_min(1)  # (L, H); NaN compares False, so it is never saturated
        per_gate[gate] = ((values < low).sum(1) / counted, (values > high).sum(1) / counted)

    num_layers = per_gate[SATURATION_GATES[0]][0].shape[0]
    layers = [{gate: {"left": left[k].tolist(), "right": right[k].tolist()} for gate, (left, right) in per_gate.items()}
              for k in range(num_layers)]
    mean = {gate: {"left": float(left.mean()), "right": float(right.mean())}
            for gate, (left, right) in per_gate.items()}
    forget_right = per_gate["forget_gate"][1]
    long_units = [{"layer": k, "unit": u, "right": float(forget_right[k, u])}
                  for k, u in (forget_right > long_memory).nonzero().tolist()]
    rule = f"forget gate > {high} on more than {long_memory:.0%} of real steps"
    return {
        "thresholds": {"low": low, "high": high, "long_memory": long_memory},
        "real_steps": real_steps,
        "layers": layers,
        "summary": {"mean": mean, "long_memory_units": long_units, "long_memory_rule": rule},
    }


def saturation_plot_data(stats: dict) -> list[dict]:
    """One row per (gate, layer, unit): {"gate", "layer", "unit", "left", "right"}, for a DVC scatter plot."""
    rows = []
    for k, layer in enumerate(stats["layers"]):
        for gate, frac in layer.items():
            for u, (left, right) in enumerate(zip(frac["left"], frac["right"])):
                rows.append({"gate": gate, "layer": k, "unit": u, "left": float(left), "right": float(right)})
    return rows


def plot_saturation(stats: dict, path: str | Path) -> Figure:
    """One panel per gate: x = left-saturated fraction, y = right-saturated fraction, a point per unit.

    Points are coloured by layer; the triangle x + y <= 1 (where every point must lie) is drawn.
    Saves a PNG at `path` and returns the figure (one scatter collection per layer in each panel).
    """
    gates = list(stats["layers"][0]) if stats["layers"] else list(SATURATION_GATES)
    fig = Figure(figsize=(4.2 * len(gates), 4.9), layout="constrained")
    axes = fig.subplots(1, len(gates), squeeze=False)[0]
    th = stats.get("thresholds", {})
    for ax, gate in zip(axes, gates):
        ax.fill([0, 1, 0], [0, 0, 1], color="0.93", zorder=0)
        ax.plot([0, 1, 0, 0], [0, 0, 1, 0], color="0.5", lw=0.8, zorder=1)
        for k, layer in enumerate(stats["layers"]):
            ax.scatter(layer[gate]["left"], layer[gate]["right"], s=18, alpha=0.8, color=f"C{k}",
                       label=f"layer {k}", zorder=2)
        ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), aspect="equal", title=_SHORT.get(gate, gate),
               xlabel=f"fraction left-saturated (< {th.get('low', 0.1)})",
               ylabel=f"fraction right-saturated (> {th.get('high', 0.9)})")
        if len(stats["layers"]) > 1:
            ax.legend(fontsize="small", loc="upper right")
    fig.suptitle("Gate saturation per unit (Karpathy, Johnson & Fei-Fei 2015)")
    _save(fig, path)
    return fig


def plot_heatmaps(trace: GateTrace, path: str | Path, batch_index: int = 0, labels: list[str] | None = None,
                  layer: int = -1, max_units: int = 64) -> Figure:
    """Heat maps of the gates and tanh(cell) over one sequence's real steps (time on x, units on y).

    `labels` (one string per real step, e.g. the characters of a passage) become the x tick
    labels, as LSTMVis shows cells over text. The first `max_units` units are shown. A trace with
    no gates (VanillaRNN) shows its hidden state. Saves a PNG and returns the figure (one image
    per panel; colour bars are extra axes).
    """
    B = trace.mask.shape[0]
    if not -B <= batch_index < B:
        raise IndexError(f"batch_index {batch_index} out of range for a batch of {B}")
    real = trace.mask[batch_index].to("cpu", torch.bool)
    steps = int(real.sum())
    if steps == 0:
        raise ValueError(f"sequence {batch_index} has no real steps")
    if labels is not None and len(labels) != steps:
        raise ValueError(f"labels has {len(labels)} entries but sequence {batch_index} has {steps} real steps")

    panels = []  # (name, (units, steps) array, colour limits, colour map)
    for name in (*GateTrace.GATES, "cell"):
        value = getattr(trace, name)
        if value is None:
            continue
        grid = value[layer, batch_index].detach().to("cpu", torch.float32)[real][:, :max_units]
        if name == "cell":
            grid = torch.tanh(grid)
        signed = name in ("candidate", "cell")
        panels.append((name, grid.T.numpy(), (-1.0, 1.0) if signed else (0.0, 1.0), "RdBu_r" if signed else "viridis"))
    if not panels:
        grid = trace.hidden[layer, batch_index].detach().to("cpu", torch.float32)[real][:, :max_units]
        panels.append(("hidden", grid.T.numpy(), (-1.0, 1.0), "RdBu_r"))

    units = panels[0][1].shape[0]
    width = float(np.clip(2.5 + 0.11 * steps, 7.0, 40.0))
    fig = Figure(figsize=(width, 0.6 + len(panels) * (0.6 + 0.05 * units)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, grid, (vmin, vmax), cmap) in zip(axes, panels):
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", origin="lower", vmin=vmin, vmax=vmax,
                          cmap=cmap)
        fig.colorbar(image, ax=ax, pad=0.01, fraction=0.03)
        ax.set_ylabel(f"{_SHORT[name]}\nunit", fontsize="small")
    axes[-1].set_xlabel("step")
    if labels is not None:
        shown = [_visible(s) for s in labels]
        axes[-1].set_xticks(range(steps), shown, fontsize=max(4.0, min(9.0, 900.0 / max(steps, 1))),
                            family="monospace")
    layer_no = layer if layer >= 0 else len(trace.hidden) + layer
    fig.suptitle(f"layer {layer_no}, sequence {batch_index}: {steps} steps, {units} units")
    _save(fig, path)
    return fig


def _visible(label: str) -> str:
    """Make blanks visible as tick labels (LSTMVis-style text under the cells)."""
    return {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "": "\u2205"}.get(label, label)


def _save(fig: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
