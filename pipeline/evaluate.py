"""Stage `evaluate`: models/<task>/ + the held-out split -> metrics, plot data, figures and samples.

    python -m pipeline evaluate <task>

Runs on one device, so no sample counts twice. Metrics come from torchmetrics. What it writes:

    metrics/<task>.json         numbers only, the task's key metric first (a DVC metric, kept in git):
                                {"accuracy": .., "f1_macro": .., "baseline": {"accuracy": ..},
                                 "long_memory_units": ..}
    plots/<task>/               plot data (kept in git, so `dvc plots diff` compares experiments):
                                saturation.json (a row per gate and unit), confusion.json (classifiers:
                                an {"actual", "predicted"} row per test sample or step, DVC's
                                `confusion` template)
    figures/<task>/             pictures (DVC cache): gate_saturation.png, gate_heatmaps.png, confusion.png
    samples/<task>/             evaluation.json (key metric name, direction, split, counts, the
                                baseline's name, the trace check: what is not a metric) and samples

The gate traces of the held-out inputs become saturation statistics and heat maps. Each
topology has one evaluator below; the task registry says which a task uses.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_dir
from pipeline.config import Params, PipelineError
from pipeline.tasks import Task, get_task

DATA_ROOT, MODELS_ROOT = Path("data/prepared"), Path("models")
METRICS_ROOT, PLOTS_ROOT, SAMPLES_ROOT = Path("metrics"), Path("plots"), Path("samples")
FIGURES_ROOT = Path("figures")
INFO_FILE = "evaluation.json"  # in samples/<task>/: what describes the metrics without being one
TRACE_SAMPLES = 256  # held-out inputs whose gates feed the saturation statistics
BATCH = 256


def _batches(dm, split: str):
    return dm.loader(split, batch_size=BATCH)


# --- one evaluator per topology: (metrics, baseline, extra files written to out dirs) ---------------


def _real_labels(arrays: dict) -> np.ndarray:
    """Every label, per-step labels only up to each sequence's length: padding is no label."""
    y = arrays["y"]
    if y.ndim == 2 and "lengths" in arrays:
        return np.concatenate([row[: int(n)] for row, n in zip(y, arrays["lengths"])])
    return y.ravel()


def _classes(model, dm, split, per_step: bool, out: Path) -> tuple[dict, dict]:
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

    labels = dm.vocab["labels"]
    k = len(labels)
    acc, f1 = MulticlassAccuracy(k, average="micro"), MulticlassF1Score(k, average="macro")
    confusion = MulticlassConfusionMatrix(k)
    rows = []  # (actual, predicted) class ids, one per sample (or real step)
    for batch in _batches(dm, split):
        if per_step:
            logits = model(batch["x"], batch.get("lengths"))
            mask = model.step_mask(batch)
            preds, target = logits.argmax(-1), batch["y"]
            if mask is not None:
                preds, target = preds[mask], target[mask]
        else:
            logits = model(*([model.sequence(batch), batch.get("lengths")] if hasattr(model, "sequence")
                             else [batch["x"]]))
            preds, target = logits.argmax(-1), batch["y"]
        for metric in (acc, f1, confusion):
            metric.update(preds.flatten(), target.flatten())
        rows.append(torch.stack([target.flatten(), preds.flatten()], 1))
    train_y = _real_labels(dm.split("train"))
    majority = Counter(train_y.tolist()).most_common(1)[0][0]
    test_y = _real_labels(dm.split(split))
    _plot_confusion(confusion.compute().numpy(), labels, out / "confusion.png")
    pairs = torch.cat(rows).tolist() if rows else []
    (out / "confusion.json").write_text(json.dumps(
        [{"actual": labels[a], "predicted": labels[p]} for a, p in pairs], separators=(",", ":")))
    metrics = {"accuracy": float(acc.compute()), "f1_macro": float(f1.compute())}
    baseline = {"name": "majority class", "accuracy": float((test_y == majority).mean())}
    return metrics, baseline


def classify(model, dm, split, out, samples):
    return _classes(model, dm, split, per_step=False, out=out)


def label_steps(model, dm, split, out, samples):
    return _classes(model, dm, split, per_step=True, out=out)


def _unigram_nll(train_ids: np.ndarray, test_ids: np.ndarray, vocab_size: int) -> float:
    counts = np.bincount(train_ids, minlength=vocab_size) + 1.0  # add-one: no zero probabilities
    logp = np.log(counts / counts.sum())
    return float(-logp[test_ids].mean())


def _token_loss(model, dm, split) -> float:
    total, count = 0.0, 0
    for batch in _batches(dm, split):
        s, n = model.loss_terms(batch)
        total, count = total + float(s), count + int(n)
    return total / count


def language_model(model, dm, split, out, samples):
    """char LM: loss (nats per character) and bits per character on held-out text."""
    loss = _token_loss(model, dm, split)
    ids = {s: np.load(dm.data_dir / f"{s}.npz")["ids"] for s in ("train", split)}
    base = _unigram_nll(ids["train"], ids[split], len(dm.vocab["chars"]))
    metrics = {"loss": loss, "bits_per_char": loss / math.log(2), "perplexity": math.exp(loss)}
    texts = []
    for prime in ("ROMEO:", "First Citizen:\n", "The king"):
        for temperature in (0.5, 0.8, 1.0):
            text = model.sample(prime, 300, temperature=temperature, seed=0)
            texts.append(f"--- prime {prime!r}, temperature {temperature}\n{text}\n")
    (samples / "samples.txt").write_text("\n".join(texts))
    return metrics, {"name": "unigram characters", "loss": base, "bits_per_char": base / math.log(2)}


def melody(model, dm, split, out, samples):
    """one_to_many: per-note NLL of the held-out lines given their seed; generated melodies as MIDI."""
    nll = _token_loss(model, dm, split)
    arrays = {s: dm.split(s) for s in ("train", split)}

    def targets(a):  # what the model predicts: every token after the seed, up to and with <eos>
        return np.concatenate([row[1:n] for row, n in zip(a["tokens"], a["lengths"])])

    base = _unigram_nll(targets(arrays["train"]), targets(arrays[split]), len(dm.vocab["tokens"]))
    _write_melodies(model, dm.vocab["tokens"], arrays[split], samples)
    return ({"nll": nll, "perplexity": math.exp(nll)},
            {"name": "unigram notes", "nll": base, "perplexity": math.exp(base)})


def translate(model, dm, split, out, samples):
    """seq2seq: exact match of greedy decodes, and corpus BLEU (torchmetrics) on word tokens."""
    from torchmetrics.text import BLEUScore

    from pipeline.datasets.translation import detokenize

    src_words, tgt_words = dm.vocab["src_tokens"], dm.vocab["tgt_tokens"]
    hyps, refs, rows = [], [], []
    for batch in _batches(dm, split):
        for src, n, out_ids, tgt, m in zip(batch["src"], batch["src_lengths"], model.greedy(batch["src"],
                                           batch["src_lengths"]), batch["tgt"], batch["tgt_lengths"]):
            hyp = detokenize([tgt_words[i] for i in out_ids])
            ref = detokenize([tgt_words[i] for i in tgt[1 : int(m) - 1].tolist()])
            hyps.append(hyp)
            refs.append(ref)
            rows.append((detokenize([src_words[i] for i in src[: int(n)].tolist()]), ref, hyp))
    exact = float(np.mean([h == r for h, r in zip(hyps, refs)]))
    bleu = BLEUScore(n_gram=4)
    tok = lambda s: " ".join(s.replace("-", " - ").split())  # noqa: E731  (hyphens as words, as tokenized)
    score = float(bleu([tok(h) for h in hyps], [[tok(r)] for r in refs]))
    lines = ["source\treference\tmodel\tmatch"] + [f"{s}\t{r}\t{h}\t{r == h}" for s, r, h in rows[:200]]
    (samples / "translations.tsv").write_text("\n".join(lines) + "\n")
    train = dm.split("train")
    common = Counter(tuple(row[: int(m)].tolist()) for row, m in zip(train["tgt"], train["tgt_lengths"]))
    top = detokenize([tgt_words[i] for i in common.most_common(1)[0][0][1:-1]])
    baseline = {"name": "most frequent training translation", "exact_match": float(np.mean([r == top for r in refs]))}
    return {"exact_match": exact, "bleu": score}, baseline


def captions(model, dm, split, out, samples):
    from pipeline.vision import evaluate_captions

    return evaluate_captions(model, dm, split, out, samples)


def video(model, dm, split, out, samples):
    from pipeline.vision import draw_strip

    metrics, baseline = label_steps(model, dm, split, out, samples)
    draw_strip(model, dm, split, out / "action_strip.png")
    return metrics, baseline


EVALUATORS = {"one_to_one": classify, "many_to_one": classify, "many_to_many": label_steps,
              "seq2seq": translate, "one_to_many": melody, "char_lm": language_model,
              "captions": captions, "video": video}


# --- pictures and samples ----------------------------------------------------------------------------


def _plot_confusion(matrix: np.ndarray, labels: list[str], path: Path) -> None:
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


def _write_melodies(model, tokens: list[str], arrays: dict, samples: Path, count: int = 4) -> None:
    """Greedy and sampled continuations of held-out seed notes: MIDI files and a piano roll."""
    import music21
    from matplotlib.figure import Figure

    seeds = torch.as_tensor(arrays["tokens"][:count, :1])
    generator = torch.Generator().manual_seed(0)
    lines = model.generate(seeds, 48, temperature=0.8, top_k=8, generator=generator)
    fig = Figure(figsize=(10, 2.2 * count))
    axes = np.atleast_1d(fig.subplots(count, 1, sharex=True))
    for k, (seed, line) in enumerate(zip(seeds[:, 0].tolist(), lines)):
        notes = [tokens[i] for i in [seed, *line] if i > 1]
        _to_midi(notes, samples / f"melody_{k}.mid")
        t = 0.0
        for pitch, dur in map(_note, notes):
            if pitch != "rest":
                axes[k].broken_barh([(t, dur)], (music21.pitch.Pitch(pitch).midi - 0.4, 0.8))
            t += dur
        axes[k].set_ylabel(f"seed {tokens[seed].split('|')[0]}\nMIDI pitch")
    axes[-1].set_xlabel("time (quarter notes)")
    fig.suptitle("generated melodies (temperature 0.8, top-k 8) from held-out seed notes")
    fig.tight_layout()
    fig.savefig(samples / "piano_roll.png", dpi=100)


def _note(token: str) -> tuple[str, float]:
    """"C5|1.0" or "rest|1/3" -> (pitch, quarter length)."""
    pitch, duration = token.split("|")
    return pitch, float(Fraction(duration))


def _to_midi(notes: list[str], path: Path) -> None:
    import music21

    stream = music21.stream.Stream()
    for pitch, ql in map(_note, notes):
        stream.append(music21.note.Rest(quarterLength=ql) if pitch == "rest"
                      else music21.note.Note(pitch, quarterLength=ql))
    stream.write("midi", fp=str(path))


def _trace_and_labels(model, dm, split, task: Task):
    """The gate trace of the first held-out inputs, and per-step labels for the first one's heat map."""
    batch = next(iter(dm.loader(split, batch_size=TRACE_SAMPLES)))
    with torch.no_grad():
        trace = model.trace(batch)
    labels = None
    if task.topology == "char_lm":
        labels = [dm.vocab["chars"][i] for i in batch["x"][0].tolist()]
    elif "tokens" in batch and "tokens" in dm.vocab:
        labels = [dm.vocab["tokens"][i] for i in batch["tokens"][0].tolist()]
    if labels is not None:
        labels = labels[: int(trace.mask[0].sum())]  # one label per real step of the first sequence
    return trace, labels


def evaluate(task_name: str, params: Params, *, data_root: Path = DATA_ROOT, models_root: Path = MODELS_ROOT,
             metrics_root: Path = METRICS_ROOT, plots_root: Path = PLOTS_ROOT, samples_root: Path = SAMPLES_ROOT,
             figures_root: Path = FIGURES_ROOT, track: bool = True, root: Path | None = None) -> str:
    from pipeline import gates
    from pipeline.datasets.datamodule import PreparedDataModule
    from pipeline.models.saved import load_trained

    task, cfg = get_task(task_name), params.task(task_name)
    model, info = load_trained(models_root / task_name)
    torch.manual_seed(params.seed)
    dm = PreparedDataModule(data_root / task_name, cfg.train.batch_size, params.seed, cfg.train.block_size)
    split = task.eval_split
    metrics_file = metrics_root / f"{task_name}.json"
    plots_dir, figures_dir = plots_root / task_name, figures_root / task_name
    samples_dir = samples_root / task_name
    # plots, figures and samples swap in together, only once everything is computed; the metrics file last
    with atomic_dir(plots_dir) as tmp_plots, atomic_dir(figures_dir) as tmp_figures, \
            atomic_dir(samples_dir) as tmp_samples:
        with torch.no_grad():
            metrics, baseline = EVALUATORS[task.evaluator or task.topology](model, dm, split, tmp_plots, tmp_samples)
        if task.key_metric not in metrics:
            raise PipelineError(f"{task_name}: the evaluator did not report the key metric {task.key_metric}")
        for picture in tmp_plots.glob("*.png"):  # evaluators draw next to their data: pictures go to the cache
            picture.replace(tmp_figures / picture.name)
        trace, labels = _trace_and_labels(model, dm, split, task)
        stats = gates.saturation(trace)
        gates.plot_saturation(stats, tmp_figures / "gate_saturation.png")
        gates.plot_heatmaps(trace, tmp_figures / "gate_heatmaps.png", batch_index=0, labels=labels)
        (tmp_plots / "saturation.json").write_text(json.dumps(gates.saturation_plot_data(stats)))
        (tmp_samples / "gate_saturation.json").write_text(json.dumps(stats, indent=1))
        key_first = [task.key_metric, *(k for k in metrics if k != task.key_metric)]
        result = {**{k: round(float(metrics[k]), 6) for k in key_first},
                  "baseline": {k: round(float(v), 6) for k, v in baseline.items() if k != "name"},
                  "long_memory_units": len(stats["summary"]["long_memory_units"])}
        about = {"key_metric": task.key_metric, "higher_is_better": task.higher_is_better, "split": split,
                 "samples": int(len(next(iter(dm.split(split).values())))), "baseline": baseline["name"],
                 "trace_reconstruction_error": float(trace.reconstruction_error)}
        (tmp_samples / INFO_FILE).write_text(json.dumps(about, indent=1) + "\n")
    metrics_root.mkdir(parents=True, exist_ok=True)
    tmp_metrics = metrics_file.with_suffix(".json.tmp")
    tmp_metrics.write_text(json.dumps(result, indent=1) + "\n")
    tmp_metrics.replace(metrics_file)
    if track and info.get("mlflow_run_id"):
        from pipeline import tracking

        tracking.log_evaluation(params, info["mlflow_run_id"], result,
                                [metrics_file, plots_dir, figures_dir, samples_dir], root=root, split=split)
    shown = ", ".join(f"{k} {result[k]:.4f}" for k in metrics)
    return f"{task_name}: {shown} (baseline {baseline['name']}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in baseline.items() if k != "name") + f") on {about['samples']} {split} samples"
