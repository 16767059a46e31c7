"""The long-term dependency experiment: "I grew up in France ... (a long gap) ... I speak fluent ___".

Each input is one "key" token (the answer, one of `vocab_size`), then `gap` distractor tokens
from a separate alphabet, then a query token; the label is the key. The answer appears only in
the first position, so a model must carry it across the whole gap. A small classifier
(embedding -> recurrent core -> linear on the final hidden state) is trained for every gap with
two cores of the same hidden size: GateLSTM and a vanilla tanh RNN. The LSTM's forget gate,
read through GateTrace, shows how it carries the answer.

Initialisation. The RNN keeps nn.RNN's standard init (uniform +-1/sqrt(H)). The LSTM keeps
nn.LSTM's init for every weight and uses the *chrono* init for its gate biases (Tallec &
Ollivier 2018, "Can recurrent neural networks warp time?"): per unit, b_f = log(u) with
u ~ U(1, T_max - 1) and b_i = -b_f, where T_max is the longest dependency the experiment asks
for: max(gaps) + 2, the same init for every gap (nothing is tuned per gap). nn.LSTM has two bias
vectors that add up, so the value goes into `bias_ih` and the slice of `bias_hh` is zeroed.
Measured on the default params (seed 1337): with the classic forget-gate bias of 1 instead
(`chrono_tmax=None, forget_bias=1`) the LSTM scored 1.00 / 1.00 / 0.49 / 0.14 / 0.10 at gaps
5 / 10 / 20 / 50 / 100 (f = sigmoid(1) = 0.73 passes 0.73^100 ~ 1e-14 of the answer's gradient);
with forget bias 5 alone it stayed at chance at gap 100 for 80 epochs. Chrono scored 0.98 at
gap 100 in 10 epochs on seed 1337 and 1.00 on seeds 1-4; with T_max 20 or 50 (shorter than the
gap) it failed, with T_max 200 or 1000 it also reached 1.00.

Training data are drawn afresh each epoch (`train_samples` per epoch; the generator is free):
on one fixed set of 2,000 sequences the LSTM memorised the distractors instead (gap 100, forget
bias 1, 40 epochs: train loss 0.73, test accuracy 0.12, chance 0.125).

Training is a plain torch loop (no Lightning): Adam(lr), gradient-norm clipping at 1.0,
`torch.manual_seed(seed)` before each model is built and batches drawn by a seeded generator,
so both cores of one gap see the same data in the same order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from pipeline.atomic import atomic_dir
from pipeline.config import LongRangeConfig, Params
from pipeline.gates import saturation
from pipeline.lstm import GateLSTM, GateTrace, VanillaRNN

matplotlib.use("Agg")

__all__ = ["NUM_DISTRACTORS", "FORGET_BIAS", "CORES", "make_longrange", "LongRangeClassifier", "chrono_tmax",
           "train_core", "accuracy", "longrange_metrics", "run_longrange", "plot_accuracy", "plot_forget_gate"]

NUM_DISTRACTORS = 8  # size of the distractor alphabet (ids vocab_size .. vocab_size + NUM_DISTRACTORS - 1)
FORGET_BIAS = 1.0  # the classic LSTM forget-gate bias, used only when chrono init is off (chrono_tmax=None)
CLIP_NORM = 1.0
PROBE_SAMPLES = 1000  # test sequences traced for the forget-gate picture and the carrier units
CORES = ("lstm", "rnn")


def make_longrange(n: int, gap: int, vocab_size: int, seed: int,
                   num_distractors: int = NUM_DISTRACTORS) -> tuple[Tensor, Tensor]:
    """n sequences [key, gap distractors..., query] of length gap + 2, and their labels (the keys).

    key:         one of 0 .. vocab_size - 1 (the answer; nowhere else in the sequence)
    distractors: vocab_size .. vocab_size + num_distractors - 1, drawn uniformly
    query:       vocab_size + num_distractors (the same token at the end of every sequence)
    The input vocabulary thus has vocab_size + num_distractors + 1 tokens.
    """
    if n <= 0 or gap < 0 or vocab_size < 2 or num_distractors < 1:
        raise ValueError(f"need n > 0, gap >= 0, vocab_size >= 2, num_distractors >= 1; got "
                         f"n={n}, gap={gap}, vocab_size={vocab_size}, num_distractors={num_distractors}")
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randint(vocab_size, (n,), generator=gen)
    distractors = torch.randint(vocab_size, vocab_size + num_distractors, (n, gap), generator=gen)
    query = torch.full((n, 1), vocab_size + num_distractors, dtype=torch.long)
    return torch.cat([keys[:, None], distractors, query], dim=1), keys.clone()


class LongRangeClassifier(nn.Module):
    """Embedding -> GateLSTM or VanillaRNN (hidden_size units) -> linear on the final hidden state.

    LSTM gate biases: chrono init with `chrono_tmax` (see the module docstring); with
    chrono_tmax=None, nn.LSTM's init with the forget-gate bias set to `forget_bias` instead.
    The RNN always keeps its standard init.
    """

    def __init__(self, core: str, vocab_size: int, hidden_size: int, num_distractors: int = NUM_DISTRACTORS,
                 chrono_tmax: float | None = None, forget_bias: float = FORGET_BIAS):
        super().__init__()
        if core not in CORES:
            raise ValueError(f"core must be one of {CORES}, got {core!r}")
        if chrono_tmax is not None and chrono_tmax <= 2:
            raise ValueError(f"chrono_tmax must be > 2, got {chrono_tmax}")
        self.core_name = core
        self.embed = nn.Embedding(vocab_size + num_distractors + 1, hidden_size)
        self.core = (GateLSTM if core == "lstm" else VanillaRNN)(hidden_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)
        if core == "lstm":
            H = hidden_size
            with torch.no_grad():  # gate order i, f, g, o: input slice [0, H), forget slice [H, 2H)
                if chrono_tmax is None:
                    self.core.bias_ih_l0[H : 2 * H].fill_(forget_bias)
                else:
                    b_f = torch.empty(H).uniform_(1.0, chrono_tmax - 1.0).log_()
                    self.core.bias_ih_l0[H : 2 * H].copy_(b_f)
                    self.core.bias_ih_l0[:H].copy_(-b_f)
                    self.core.bias_hh_l0[:H].zero_()
                self.core.bias_hh_l0[H : 2 * H].zero_()

    def forward(self, x: Tensor, return_gates: bool = False):
        """Logits (batch, vocab_size); plus the core's GateTrace when return_gates."""
        out = self.core(self.embed(x), return_gates=return_gates)
        h_n = out[1][0] if self.core_name == "lstm" else out[1]
        logits = self.head(h_n[-1])
        return (logits, out[2]) if return_gates else logits


def _data_seed(seed: int, gap: int, split: int) -> int:
    """Distinct, reproducible data seeds per (seed, gap, split): split 0 is the test set, 1 + e epoch e."""
    return int(np.random.SeedSequence([seed, gap, split]).generate_state(1, np.uint64)[0] >> 1)


def chrono_tmax(cfg: LongRangeConfig) -> float:
    """The LSTM's chrono T_max: the longest sequence of the experiment (largest gap + key + query)."""
    return float(max(cfg.gaps) + 2)


def train_core(core: str, gap: int, cfg: LongRangeConfig, seed: int,
               fresh_data: bool = True) -> tuple[LongRangeClassifier, list[float]]:
    """Train one classifier on `gap`; returns it (in eval mode) and the mean training loss per epoch.

    Each epoch draws `cfg.train_samples` fresh sequences (the same ones for both cores) when
    `fresh_data`; otherwise epoch 0's set is reused every epoch.
    """
    torch.manual_seed(seed)
    model = LongRangeClassifier(core, cfg.vocab_size, cfg.hidden_size, chrono_tmax=chrono_tmax(cfg))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    order = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for epoch in range(cfg.max_epochs):
        if fresh_data or epoch == 0:
            x, y = make_longrange(cfg.train_samples, gap, cfg.vocab_size, _data_seed(seed, gap, 1 + epoch))
        total = 0.0
        for idx in torch.randperm(len(x), generator=order).split(cfg.batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
    return model.eval(), losses


@torch.no_grad()
def accuracy(model: LongRangeClassifier, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(y)


def longrange_metrics(results: dict) -> dict:
    """The numbers DVC shows (metrics.json): test accuracy per core and gap, the longest gap first,
    e.g. {"lstm": {"gap_100": 0.98, "gap_50": ..}, "rnn": {..}, "chance": 0.125, "carrier_units": 3}.
    The lists, losses, timings and probe details stay in results.json."""
    per_core = {core: {f"gap_{g}": round(float(a), 6) for g, a in sorted(zip(results["gaps"], results[core]),
                                                                        reverse=True)} for core in CORES}
    return {**per_core, "chance": round(float(results["chance"]), 6),
            "carrier_units": len(results.get("probe", {}).get("carrier_units", []))}


def run_longrange(params: Params, out_dir: Path = Path("longrange")) -> str:
    """Train LSTM and RNN on every gap; write metrics.json (numbers for DVC), results.json (everything),
    accuracy.json (a {"gap", "core", "accuracy"} row per gap and core: DVC plot data), accuracy.png and
    forget_gate.png, all at once.

    Runs on one torch thread (the count is restored afterwards). Returns a one-line summary.
    """
    threads = torch.get_num_threads()
    # The models are tiny (hidden 32): a second intra-op thread buys nothing, and when another
    # process holds a core two threads stall against it (measured: the default run took 87 s on
    # two threads beside another training, 10 s on one thread beside the same load).
    torch.set_num_threads(1)
    try:
        return _run_longrange(params, Path(out_dir))
    finally:
        torch.set_num_threads(threads)


def _run_longrange(params: Params, out_dir: Path) -> str:
    cfg, seed = params.longrange, params.seed
    start = time.perf_counter()
    results = {"gaps": list(cfg.gaps), "lstm": [], "rnn": [], "chance": 1.0 / cfg.vocab_size,
               "train_loss": {c: [] for c in CORES}, "timings": {c: [] for c in CORES}}
    largest = max(cfg.gaps)
    probe = None
    for gap in cfg.gaps:
        x_test, y_test = make_longrange(cfg.test_samples, gap, cfg.vocab_size, _data_seed(seed, gap, 0))
        for core in CORES:
            t0 = time.perf_counter()
            model, losses = train_core(core, gap, cfg, seed)
            results[core].append(accuracy(model, x_test, y_test))
            results["timings"][core].append(round(time.perf_counter() - t0, 3))
            results["train_loss"][core].append([round(v, 5) for v in losses])
            if core == "lstm" and gap == largest and probe is None:
                probe = (model, x_test, y_test, gap)
    model, x_test, y_test, gap = probe
    x_probe, y_probe = x_test[:PROBE_SAMPLES], y_test[:PROBE_SAMPLES]
    with torch.no_grad():
        _, trace = model(x_probe, return_gates=True)
    carriers = _carrier_units(trace, y_probe, cfg.vocab_size)
    stats = saturation(trace)
    results["probe"] = {
        "gap": gap,
        "sequences": len(y_probe),
        "example": 0,
        "carrier_units": carriers,
        "saturation": stats["summary"],
        "reconstruction_error": trace.reconstruction_error,
    }
    results["timings"]["total_s"] = round(time.perf_counter() - start, 3)

    rows = [{"gap": g, "core": core, "accuracy": acc} for core in CORES for g, acc in zip(cfg.gaps, results[core])]
    with atomic_dir(out_dir) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(longrange_metrics(results), indent=1) + "\n")
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "accuracy.json").write_text(json.dumps(rows, indent=2) + "\n")
        plot_accuracy(results, tmp / "accuracy.png")
        plot_forget_gate(trace, y_probe, carriers, tmp / "forget_gate.png", example=0)
    fmt = lambda accs: "/".join(f"{a:.2f}" for a in accs)  # noqa: E731
    return (f"longrange: gaps {'/'.join(map(str, cfg.gaps))}: LSTM {fmt(results['lstm'])}, "
            f"RNN {fmt(results['rnn'])} (chance {results['chance']:.3f}) in {time.perf_counter() - start:.0f} s "
            f"-> {out_dir}/")


def _carrier_units(trace: GateTrace, y: Tensor, vocab_size: int, top: int = 3) -> list[dict]:
    """The units whose cell state just before the query best tells the answer apart.

    Score: eta^2 of the final-gap cell value grouped by answer (between-answer variance / total
    variance, in [0, 1]). Also reports each unit's mean forget gate over the gap.
    """
    cell = trace.cell[-1, :, -2, :].double()  # (B, H): the cell after the last distractor
    total = cell.var(0, unbiased=False).clamp_min(1e-12)
    means = torch.stack([cell[y == k].mean(0) if bool((y == k).any()) else cell.mean(0) for k in range(vocab_size)])
    counts = torch.bincount(y, minlength=vocab_size).double()[:, None]
    between = (counts * (means - cell.mean(0)) ** 2).sum(0) / len(y)
    eta2 = (between / total).clamp(0, 1)
    forget_gap = trace.forget_gate[-1, :, 1:-1, :].double().mean((0, 1))  # over distractor steps, all examples
    order = eta2.argsort(descending=True)[:top].tolist()
    return [{"unit": u, "eta2": round(float(eta2[u]), 4), "mean_forget_over_gap": round(float(forget_gap[u]), 4)}
            for u in order]


def plot_accuracy(results: dict, path: Path) -> Figure:
    """Test accuracy against gap for both cores, with the chance line."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    for core, label in (("lstm", "LSTM (GateLSTM)"), ("rnn", "vanilla RNN")):
        ax.plot(results["gaps"], results[core], marker="o", label=label)
    ax.axhline(results["chance"], color="0.4", ls="--", lw=1, label=f"chance (1/{round(1 / results['chance'])})")
    ax.set_xscale("log")
    ax.set_xticks(results["gaps"], [str(g) for g in results["gaps"]])
    ax.minorticks_off()
    ax.set(ylim=(0, 1.05), xlabel="gap (distractor tokens between the answer and the query)",
           ylabel="test accuracy", title="Remembering one token across a gap")
    ax.legend()
    fig.savefig(path, format="png", dpi=110)
    return fig


def plot_forget_gate(trace: GateTrace, y: Tensor, carriers: list[dict], path: Path, example: int = 0) -> Figure:
    """The LSTM across the gap for test sequence `example`, in three panels.

    1. forget gate per step: mean over units, the 10-90% band, and the carrier units;
    2. forget gate, units x steps;
    3. the cell state of the strongest carrier unit, for this example and for one test example
       of every other answer (how the unit keeps the answers apart across the gap).
    Returns the figure (3 panels + a colour bar).
    """
    f = trace.forget_gate[-1, example].float().numpy()  # (T, H)
    T, H = f.shape
    steps = np.arange(T)
    units = [d["unit"] for d in carriers]
    fig = Figure(figsize=(11, 8.5), layout="constrained")
    ax_mean, ax_heat, ax_cell = fig.subplots(3, 1, sharex=True, height_ratios=[1, 1.6, 1.2])

    ax_mean.plot(steps, f.mean(1), color="k", lw=1.5, label="mean over units")
    ax_mean.fill_between(steps, np.percentile(f, 10, axis=1), np.percentile(f, 90, axis=1), color="0.8",
                         label="10-90% of units")
    for k, u in enumerate(units):
        ax_mean.plot(steps, f[:, u], color=f"C{k + 2}", lw=1, label=f"carrier unit {u}")
    ax_mean.set(ylim=(0, 1.02), ylabel="forget gate f_t")
    ax_mean.legend(fontsize="small", ncol=len(units) + 2, loc="lower left")

    image = ax_heat.imshow(f.T, aspect="auto", interpolation="nearest", origin="lower", vmin=0, vmax=1,
                           cmap="viridis", extent=(-0.5, T - 0.5, -0.5, H - 0.5))
    fig.colorbar(image, ax=ax_heat, pad=0.01, fraction=0.03, label="f_t")
    ax_heat.set_ylabel("unit")

    # the strongest carrier's cell for one test example per answer: the answer sets its course
    top = units[0]
    cell_all = trace.cell[-1, :, :, top].float().numpy()  # (B, T)
    for key in range(int(y.max()) + 1):
        rows = (y == key).nonzero().flatten().tolist()
        if not rows:
            continue
        row = example if int(y[example]) == key else rows[0]
        ax_cell.plot(steps, cell_all[row], color=f"C{key % 10}", lw=2.2 if row == example else 1.0,
                     label=f"answer {key}" + (" (this example)" if row == example else ""))
    ax_cell.axhline(0, color="0.6", lw=0.8)
    ax_cell.set(xlabel="step (0: the answer; last: the query)",
                ylabel=f"cell c_t of unit {top}\n(eta2 {carriers[0]['eta2']:.2f})")
    ax_cell.legend(fontsize="x-small", loc="best", ncol=2)
    for ax in (ax_mean, ax_heat, ax_cell):
        ax.axvline(0, color="r", lw=0.8, ls=":")
        ax.axvline(T - 1, color="r", lw=0.8, ls=":")
    fig.suptitle(f"LSTM forget gate across a gap of {T - 2}: answer token {int(y[example])} at step 0, "
                 f"query at step {T - 1}")
    fig.savefig(path, format="png", dpi=110)
    return fig

