"""Stage `explore`: one self-contained, offline HTML gate explorer per model, and the units that mean something.

    python -m pipeline explore <task>                      explorer/<task>.html (held-out samples), probes/<task>.json
    python -m pipeline explore <task> --text "..." [--out]  a page for the user's own input (char LM, sentiment,
                                                           translation; melody: notes such as "C5|1.0 D5|0.5")
    python -m pipeline explore <task> --index 3 7 [--out]   held-out samples by index (char LM: character offset)
    python -m pipeline explore <task> --file x.npy [--out]  digits, gesture, activity: arrays as `predict` takes

The page (LSTMVis, Strobelt et al. 2018; Karpathy, Johnson & Fei-Fei 2015) shows the input as the user knows
it (characters, words, notes, a plotted series, images for one-step models), each step coloured by one unit's
gate (input, forget, candidate, output) or cell; hovering a step shows that unit's four gates and cell and the
model's top-5 next predictions where it predicts per step; the unit list sorts by saturation, by correlation
with a probe, or by how well a unit matches a selected range above a threshold (on inside, off outside), and
lists the other places where the chosen unit fires. It needs no network: JS, CSS and data are inline and a
Content-Security-Policy forbids every fetch. Data: every (channel, unit) quantized to 8 bits over its own
range on the page (error <= range / 510), the byte blob deflated and base64-encoded.

Probes: per-step quantities a unit might track (char LM: position in line, inside quotes, inside brackets,
speaker name; others: position, class, pitch, tokens left). `probe_correlations` finds, per probe, the unit
whose tanh(cell) correlates best (Pearson, over every real step of the held-out probe corpus) and the same
number for an untrained model of the same shape (the control: what chance alignment gives).

Shown: the top layer (both directions of a bidirectional one, units numbered direction-major); for seq2seq the
decoder. Per-topology knowledge (what a step displays as, what the model predicts at a step, which probes fit)
lives in one `Explorer` per topology, which the topology object names (`Topology.explorer`, "module:Class":
named, not imported, so training never depends on this module); the stage never looks at a task's name.
"""

from __future__ import annotations

import base64
import importlib
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import check_file_targets, write_file_atomic
from pipeline.batch import BOS, EOS, SEQUENCE_EOS, SEQUENCE_SPECIALS, UNK
from pipeline.config import Params, PipelineError
from pipeline.datasets.prepared import load_split

MODELS_ROOT, DATA_ROOT = Path("models"), Path("data/prepared")
PAGES_ROOT, PROBES_ROOT = Path("explorer"), Path("probes")
ASSETS = Path(__file__).parent / "explorer"  # explorer.html, explorer.css, explorer.js: inlined at write time
CHANNELS = ("input_gate", "forget_gate", "candidate", "output_gate", "cell")
TOP_K = 5
PAGE_SAMPLES = 12  # held-out sequences on a default page
CHARLM_PAGE_CHARS = 1000  # characters of held-out text on the char LM's page
GALLERY = 100  # images on a one-step model's page (10 per class where possible)
PROBE_SAMPLES = 512  # held-out sequences the probe correlations run over
PROBE_CHARS = 40_000  # held-out characters the char LM's probe correlations run over
QUOTE_WINDOW = 300  # characters around each double quote the char LM's probes also read
CHAR_ROW, CHAR_WARMUP = 1000, 100  # the char LM's probe text is read in rows of 1000 characters, each after 100


# --- what one page holds -----------------------------------------------------------------------------------


@dataclass
class Sample:
    """One sequence on a page: display, per-step gates of the shown units, predictions and probes.

    gates: channel -> (T, U) float32 (cell raw, not tanh); labels: T display strings (text: characters;
    tokens: words or notes; series, images: the step's label or ""); sub: optional second line per step;
    picture: an image the whole sequence is conditioned on (a caption's picture), (H, W, 3) uint8 RGB;
    values: series (N, C) float or images (T, H, W) in [0, 1]; per_step: samples of `values` per step (series);
    top_ids/top_p: (T, k) predicted tokens (next token, or the step's class) and probabilities; actual: the true
    token each step's prediction is scored against ("" unknown); probes: name -> (T,) float (NaN: undefined)."""

    title: str
    labels: list[str]
    gates: dict[str, np.ndarray]
    sub: list[str] | None = None
    values: np.ndarray | None = None
    per_step: int = 1
    top_ids: np.ndarray | None = None
    top_p: np.ndarray | None = None
    actual: list[str] | None = None
    probes: dict[str, np.ndarray] = field(default_factory=dict)
    picture: np.ndarray | None = None  # what the sequence is conditioned on, shown beside it: (H, W, 3) uint8 RGB

    @property
    def steps(self) -> int:
        return len(self.labels)


@dataclass
class Page:
    task: str
    topology: str
    kind: str  # text | tokens | series | images
    units: list[str]  # unit names, e.g. "17" or "→17" / "←17" (bidirectional)
    samples: list[Sample]
    vocab: list[str] | None = None  # names of predicted tokens (top_ids index into it)
    channel_names: list[str] | None = None  # series: the input's channel names
    about: dict = field(default_factory=dict)  # model and probe facts shown in the header


# --- traces -> arrays --------------------------------------------------------------------------------------


def top_layer(trace) -> tuple[dict[str, np.ndarray], list[str]]:
    """channel -> (B, T, U) float32 of the trace's top layer (directions side by side), and the unit names."""
    D = trace.num_directions
    entries = range(trace.hidden.shape[0] - D, trace.hidden.shape[0])
    H = trace.cell.shape[-1]
    out = {c: torch.cat([getattr(trace, c)[k] for k in entries], dim=-1).float().cpu().numpy() for c in CHANNELS}
    units = [str(u) for u in range(H)] if D == 1 else [f"{a}{u}" for a in ("→", "←") for u in range(H)]
    return out, units


def topk(logits: torch.Tensor, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """(..., V) logits -> the k likeliest ids and their softmax probabilities, each (..., min(k, V))."""
    p = torch.softmax(logits.float(), dim=-1)
    best = torch.topk(p, min(k, p.shape[-1]), dim=-1)
    return best.indices.cpu().numpy(), best.values.cpu().numpy()


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in arrays.items()}


def _take(arrays: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    idx = np.asarray(idx, dtype=np.int64)
    return {k: v[idx] for k, v in arrays.items()}


def _prob_title(names: list[str], logits: torch.Tensor, true: int | None) -> str:
    p = torch.softmax(logits.float(), -1)
    best = int(p.argmax())
    said = f"model: {names[best]} ({float(p[best]):.2f})"
    return said if true is None else f"true: {names[true]} · {said}"


def _check_indices(index: list[int], n: int, what: str) -> list[int]:
    bad = [i for i in index if not 0 <= i < n]
    if bad:
        raise PipelineError(f"--index {bad[0]} is out of range: the held-out split has {n} {what} (0..{n - 1})")
    return list(index)


# --- per-topology explorers ----------------------------------------------------------------------------------


class Explorer:
    """How one topology's inputs become page samples. Subclasses say what a step shows, what the model predicts
    at a step, and which probes fit; `samples` runs the model (trace + per-step predictions) on arrays in the
    prepared-data format. `default_input` picks the held-out page input, `probe_input` the probe corpus,
    `user_input` turns --text/--file/--index into arrays (PipelineError on bad input)."""

    kind = "tokens"
    takes_text = False  # --text (else --file) besides --index
    layer_note = ""  # which recurrent core the page shows, when the model has more than one

    def accepts(self, model) -> list[str]:
        return ["--text" if self.takes_text else "--file", "--index"]

    def default_input(self, model, split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _take(split, np.arange(min(PAGE_SAMPLES, len(next(iter(split.values()))))))

    def probe_input(self, model, split: dict[str, np.ndarray], train=None) -> list[dict[str, np.ndarray]]:
        """Batches of the probe corpus; `train`, when given, returns the training split (read only if needed)."""
        n = len(next(iter(split.values())))
        idx = np.arange(min(PROBE_SAMPLES, n))
        return [_take(split, idx[i : i + 128]) for i in range(0, len(idx), 128)]

    def user_input(self, model, split, text: str | None, files: list[str] | None, index: list[int] | None):
        if index is not None:
            return _take(split, _check_indices(index, len(next(iter(split.values()))), "samples"))
        what = "--text" if text is not None else "--file"
        raise PipelineError(f"{what} is not an input this model takes; it takes {' or '.join(self.accepts(model))}")

    def samples(self, model, arrays: dict[str, np.ndarray]) -> tuple[list[Sample], list[str]]:
        raise NotImplementedError

    def vocab(self, model) -> list[str] | None:
        return None

    def channel_names(self, model) -> list[str] | None:
        return None


def _position(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64)


# char LM ---------------------------------------------------------------------------------------------------

SPEAKER = re.compile(r"(?m)(?:(?<=\n\n)|\A)([A-Z][A-Z .'\-]*[A-Z]\.)(?=\n)")  # "FAL.", "KING HENRY." on a line


def charlm_probes(text: str) -> dict[str, np.ndarray]:
    """Per character, the state after reading it: position_in_line (characters since the newline, which is 0),
    inside_quotes (after an opening '"', up to its closing one), inside_brackets (more '(' '[' opened than
    closed), and speaker_name (a character of a speaker's name line: a blank line, then "NAME." in capitals).
    Quotes and brackets start afresh at every blank line (a new speech), so one stray mark does not leave the
    rest of the text "inside"; a closing mark with nothing open is ignored."""
    chars = np.array(list(text)) if text else np.array([], dtype="<U1")
    n = len(text)
    newline = chars == "\n"
    idx = np.arange(n)
    last_nl = np.maximum.accumulate(np.where(newline, idx, -1)) if n else idx
    position = (idx - last_nl).astype(np.float64)
    position[newline] = 0.0
    quotes, brackets = np.zeros(n), np.zeros(n)
    inside, depth, previous = False, 0, ""
    for t, c in enumerate(text):
        if c == "\n" and previous == "\n":
            inside, depth = False, 0
        elif c == '"':
            inside = not inside
        elif c in "([":
            depth += 1
        elif c in ")]":
            depth = max(0, depth - 1)
        quotes[t], brackets[t], previous = inside, depth > 0, c
    speaker = np.zeros(n)
    for m in SPEAKER.finditer(text):
        speaker[m.start(1) : m.end(1)] = 1.0
    return {"position_in_line": position, "inside_quotes": quotes, "inside_brackets": brackets,
            "speaker_name": speaker}


class CharLMExplorer(Explorer):
    kind, takes_text = "text", True

    def _text(self, model, ids) -> str:
        return model.decode([int(i) for i in ids])

    def default_input(self, model, split):
        ids = split["ids"]
        text = self._text(model, ids[: min(len(ids), 20_000)])
        start = text.find("\n\n") + 2 if "\n\n" in text else 0  # begin at a speech, as a reader would
        return {"x": ids[None, start : start + CHARLM_PAGE_CHARS]}

    def probe_input(self, model, split, train=None):
        """The first PROBE_CHARS held-out characters in rows of CHAR_ROW, plus a window of QUOTE_WINDOW characters
        around every double quote of the whole text (train and held-out: Shakespeare's held-out tenth holds four
        quotations, too few to find a quote cell). Each row is read after the CHAR_WARMUP characters before it,
        which are not counted; probes come from the whole text, so a quote opened before a row is open in it."""
        held_out = split["ids"]
        pieces = [(held_out, [(max(0, a - CHAR_WARMUP), min(a + CHAR_ROW, PROBE_CHARS, len(held_out)), a)
                              for a in range(0, min(PROBE_CHARS, len(held_out)), CHAR_ROW)])]
        if train is not None:
            ids = np.concatenate([train()["ids"], held_out])
            quote = model.vocab["chars"].index('"') if '"' in model.vocab["chars"] else -1
            rows, end = [], 0
            for q in np.flatnonzero(ids == quote):
                a = int(q) - QUOTE_WINDOW // 3
                if a >= end and a - CHAR_WARMUP >= 0 and a + QUOTE_WINDOW <= len(ids):
                    rows.append((a - CHAR_WARMUP, a + QUOTE_WINDOW, a))
                    end = a + QUOTE_WINDOW
            pieces.append((ids, rows))
        batches = []
        for ids, rows in pieces:
            probes = charlm_probes(self._text(model, ids[: max((b for _, b, _ in rows), default=0)]))
            for length in sorted({b - lo for lo, b, _ in rows}):
                same = [r for r in rows if r[1] - r[0] == length]
                for i in range(0, len(same), 16):
                    part = same[i : i + 16]
                    cut = {f"probe:{k}": np.stack([v[lo:b] for lo, b, _ in part]) for k, v in probes.items()}
                    batches.append({"x": np.stack([ids[lo:b] for lo, b, _ in part]),
                                    "skip": np.array([a - lo for lo, _, a in part]), **cut})
        return batches

    def user_input(self, model, split, text, files, index):
        if text is not None:
            if not text:
                raise PipelineError("--text is empty: give at least one character")
            try:
                return {"x": np.asarray([model.encode(text)], dtype=np.int64)}
            except ValueError as err:
                raise PipelineError(f"--text: {err}") from None
        if index is not None:
            n = len(split["ids"])
            start = _check_indices(index[:1], n, "characters")[0]
            return {"x": split["ids"][None, start : start + CHARLM_PAGE_CHARS]}
        return super().user_input(model, split, text, files, index)

    def vocab(self, model):
        return list(model.vocab["chars"])

    def samples(self, model, arrays):
        x = torch.as_tensor(arrays["x"])
        skips = arrays["skip"] if "skip" in arrays else np.zeros(x.shape[0], dtype=int)
        with torch.no_grad():
            trace = model.trace({"x": x})
            logits, _ = model(x)
        gates, units = top_layer(trace)
        ids, p = topk(logits)
        out = []
        for b in range(x.shape[0]):
            text, skip = self._text(model, x[b].tolist()), int(skips[b])
            given = {k.removeprefix("probe:"): v[b] for k, v in arrays.items() if k.startswith("probe:")}
            probes = given or charlm_probes(text)
            out.append(Sample(title=f"{len(text) - skip} characters", labels=list(text[skip:]),
                              gates={c: v[b, skip:] for c, v in gates.items()}, top_ids=ids[b, skip:],
                              top_p=p[b, skip:], actual=list(text[skip + 1 :]) + [""],
                              probes={k: v[skip:] for k, v in probes.items()}))
        return out, units


# one_to_many (melody) ----------------------------------------------------------------------------------------


def _midi(pitch: str) -> float:
    """"C5" -> 72.0, "E-4" -> 63.0 (music21's spelling: '-' flat, '#' sharp); NaN for rests and specials."""
    m = re.fullmatch(r"([A-G])([#\-]*)(-?\d+)", pitch)
    if not m:
        return math.nan
    base = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}[m[1]]
    return float(12 * (int(m[3]) + 1) + base + m[2].count("#") - m[2].count("-"))


def _duration(token: str) -> float:
    try:
        return float(Fraction(token.split("|")[1]))
    except (IndexError, ValueError, ZeroDivisionError):
        return math.nan


class MelodyExplorer(Explorer):
    takes_text = True

    def vocab(self, model):
        return list(model.vocab["tokens"])

    def user_input(self, model, split, text, files, index):
        if text is not None:
            tokens = self.vocab(model)
            lookup = {t: i for i, t in enumerate(tokens)}
            notes = text.split()
            unknown = [t for t in notes if t not in lookup or t in SEQUENCE_SPECIALS]
            if not notes or unknown:
                known = [t for t in tokens if t not in SEQUENCE_SPECIALS][:3]
                raise PipelineError(f"--text: give notes the model knows, separated by spaces, such as "
                                    f"{' '.join(known)}; unknown: {' '.join(unknown) or '(none given)'}")
            ids = [lookup[t] for t in notes] + [SEQUENCE_EOS]  # <eos> ends it, as in the prepared data
            return {"tokens": np.asarray([ids]), "lengths": np.asarray([len(ids)])}
        return super().user_input(model, split, text, files, index)

    def samples(self, model, arrays):
        batch = _tensors(arrays)
        with torch.no_grad():
            trace = model.trace(batch)
            inputs, lengths, targets, logits = model.step_predictions(batch)  # the model's own conditioning
        gates, units = top_layer(trace)
        ids, p = topk(logits)
        names = self.vocab(model)
        out = []
        for b, n in enumerate(lengths.tolist()):
            toks = [names[i] for i in inputs[b, :n].tolist()]
            out.append(Sample(
                title=f"sequence {b}: {n} steps", labels=[t.split("|")[0] for t in toks],
                sub=[t.split("|")[1] if "|" in t else "" for t in toks],
                gates={c: v[b, :n] for c, v in gates.items()}, top_ids=ids[b, :n], top_p=p[b, :n],
                actual=[names[i] for i in targets[b, :n].tolist()],
                probes={"position": _position(n), "pitch_midi": np.array([_midi(t.split("|")[0]) for t in toks]),
                        "duration_quarters": np.array([_duration(t) for t in toks])}))
        return out, units


class CaptionsExplorer(MelodyExplorer):
    """one_to_many from an image (captions): the words of each held-out caption as the decoder reads them under
    teacher forcing (<eos> first: "start of caption"), its picture beside them, and the model's own caption
    (as `predict` writes it) in the title. Probes: position, and whether the step predicts the caption's last
    word."""

    takes_text = False

    def user_input(self, model, split, text, files, index):
        """--file: PNG/JPEG files as `predict` takes them; each page sample is the decoder reading back the caption
        the model writes for the picture (there is no true caption to read)."""
        if text is not None:
            raise PipelineError("--text: the captions model reads images: give PNG/JPEG files with --file, "
                                "or held-out images with --index")
        if not files:
            return super().user_input(model, split, text, files, index)
        from pipeline.models.vision import caption_inputs, generate_captions
        from pipeline.serving_inputs import InputError

        for name in files:
            if not Path(name).is_file():
                raise PipelineError(f"--file: {name}: {'a folder' if Path(name).is_dir() else 'no such file'}")
        try:  # the files' bytes, as `predict captions` sends them (the model itself opens no path)
            images = caption_inputs({"image": [Path(name).read_bytes() for name in files]}, model.vocab["image_shape"])
        except InputError as err:
            raise PipelineError(f"--file: {err}") from None
        self.files = [Path(f).name for f in files]  # the sample titles name them
        lookup = {w: i for i, w in enumerate(self.vocab(model))}
        rows = [[lookup[w] for w in said.split()] + [SEQUENCE_EOS] for said in generate_captions(model, images)]
        tokens = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
        for b, row in enumerate(rows):
            tokens[b, : len(row)] = row
        return {"image": images, "tokens": tokens, "lengths": np.array([len(r) for r in rows])}

    def samples(self, model, arrays):
        from pipeline.models.vision import generate_captions  # the captions `predict` and evaluation write

        batch = _tensors(arrays)
        with torch.no_grad():
            trace = model.trace(batch)
            inputs, lengths, targets, logits = model.step_predictions(batch)  # conditioned on each picture
            said = generate_captions(model, arrays["image"])
        gates, units = top_layer(trace)
        ids, p = topk(logits)
        names = self.vocab(model)
        out = []
        for b, n in enumerate(lengths.tolist()):
            if "words" in arrays and "words" in model.vocab:  # the true caption in full (<unk> words too)
                truth = " ".join(model.vocab["words"][j] for j in arrays["words"][b].tolist() if j)
                title = f"image {b}: \"{truth}\" · the model says \"{said[b]}\""
            else:  # the user's picture: no true caption; the words read back are the model's own
                files = getattr(self, "files", [])
                title = f"{files[b] if b < len(files) else f'image {b}'}: the model says \"{said[b]}\""
            out.append(Sample(
                title=title,
                labels=[names[i] for i in inputs[b, :n].tolist()], picture=arrays["image"][b],
                gates={c: v[b, :n] for c, v in gates.items()}, top_ids=ids[b, :n], top_p=p[b, :n],
                actual=[names[i] for i in targets[b, :n].tolist()],
                probes={"position": _position(n), "last_word": (np.arange(n) == n - 2).astype(float)}))
        return out, units


# many_to_one (sentiment: tokens; gesture: a series) -------------------------------------------------------------


def _class_probes(labels: list[str], y: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """class=<name> indicators (per step, or one label repeated) for up to 10 classes."""
    if len(labels) > 10:
        return {}
    named = list(enumerate(labels))[1:] if len(labels) == 2 else list(enumerate(labels))  # 2 classes: one probe
    y = np.broadcast_to(np.asarray(y), (n,)) if np.ndim(y) == 0 else np.asarray(y)[:n]
    return {f"class={name}": (y == k).astype(np.float64) for k, name in named}


class ManyToOneExplorer(Explorer):
    def default_input(self, model, split):
        y = split["y"]
        members = [np.flatnonzero(y == k) for k in sorted(set(y.tolist()))]
        # the classes in turn (first of each class, then the second, ...): every class is on the page
        order = [int(m[r]) for r in range(max(map(len, members))) for m in members if r < len(m)]
        return _take(split, order[: max(PAGE_SAMPLES, len(members))])

    @staticmethod
    def is_text(model) -> bool:
        return "tokens" in model.vocab

    def accepts(self, model) -> list[str]:
        return ["--text" if self.is_text(model) else "--file", "--index"]

    def user_input(self, model, split, text, files, index):
        if text is not None and self.is_text(model):
            from pipeline.text import encode

            ids = encode(text, model.vocab)
            return {"tokens": np.asarray([ids]), "lengths": np.asarray([len(ids)]), "y": np.asarray([-1]),
                    "words": np.asarray([_words(text, len(ids))], dtype=object)}
        if files and not self.is_text(model):
            return _series_files(model, files)
        return super().user_input(model, split, text, files, index)

    def samples(self, model, arrays):
        batch = _tensors({k: v for k, v in arrays.items() if k != "words"})
        seq = model.sequence(batch)
        with torch.no_grad():
            trace = model.trace(batch)
            logits = model(seq, batch.get("lengths"))
        gates, units = top_layer(trace)
        labels = model.vocab["labels"]
        stride = model.model_cfg.frame_stride if not self.is_text(model) else 1
        out = []
        for b in range(seq.shape[0]):
            n_raw = int(batch["lengths"][b]) if "lengths" in batch else seq.shape[1]
            n = -(-n_raw // stride)
            y = int(arrays["y"][b]) if "y" in arrays and int(arrays["y"][b]) >= 0 else None
            title = _prob_title(labels, logits[b], y)
            probes = {"position": _position(n), **(_class_probes(labels, y, n) if y is not None else {})}
            if self.is_text(model):
                words = list(arrays["words"][b]) if "words" in arrays else None
                names = model.vocab["tokens"]
                ids = seq[b, :n].tolist()
                shown = words if words else [names[i] for i in ids]
                sub = ["unknown" if i == UNK else "" for i in ids]
                out.append(Sample(title=title, labels=shown, sub=sub, gates={c: v[b, :n] for c, v in gates.items()},
                                  probes=probes))
            else:
                values = seq[b, :n_raw].numpy()
                probes["input_mean"] = np.array([values[t * stride : (t + 1) * stride].mean() for t in range(n)])
                out.append(Sample(title=title, labels=[""] * n, values=values, per_step=stride,
                                  gates={c: v[b, :n] for c, v in gates.items()}, probes=probes))
        return out, units

    def channel_names(self, model):
        return None if self.is_text(model) else _channel_names(model)


FRAME_CHANNELS = ["brightness (mean pixel, 0-255)", "x centre (px)", "y centre (px)"]


def _frame_summary(frames: np.ndarray) -> np.ndarray:
    """(n, H, W) frames -> (n, 3): each frame's mean brightness and the column and row of its centre of mass,
    the series a page draws for a clip (a moving object's path; its brightness grows with its size)."""
    f = np.asarray(frames, dtype=np.float64)
    mass = f.sum((1, 2))
    safe = np.where(mass > 0, mass, 1.0)
    cx = (f.sum(1) * np.arange(f.shape[2])).sum(1) / safe
    cy = (f.sum(2) * np.arange(f.shape[1])).sum(1) / safe
    return np.stack([f.mean((1, 2)), cx, cy], 1)


def _channel_names(model) -> list[str]:
    """The input's channel names: the vocabulary's "features" (column names of a user's table), a clip's frame
    summary (FRAME_CHANNELS) or "channel k"."""
    if "frame_shape" in model.vocab:  # steps are frames (H, W): the page draws their summary
        return list(FRAME_CHANNELS)
    names = model.vocab.get("features")
    C = model.dims["input_shape"][-1]
    return list(names) if isinstance(names, list) and len(names) == C else [f"channel {c}" for c in range(C)]


def _words(text: str, n: int) -> list[str]:
    """The user's words as typed (tokenized, original case) for display, cut to the n tokens the model read."""
    from pipeline.text import TOKEN

    return TOKEN.findall(text)[:n] or ["<unk>"]


def _series_files(model, files: list[str]) -> dict[str, np.ndarray]:
    """.npy files (one series (T, C) or (T,), or a NaN-padded stack) -> normalised, zero-padded arrays."""
    from pipeline.datasets.common import pad
    from pipeline.serving_inputs import InputError, series

    channels = model.dims["input_shape"][-1]
    rows = []
    for name in files:
        x = _load_npy(name)
        try:
            rows.extend(series(x if x.ndim == 3 or (x.ndim == 2 and channels == 1 and x.shape[1] != 1)
                               else x[None], channels))
        except InputError as err:
            raise PipelineError(f"{name}: {err.message}") from None
    mean, std = np.asarray(model.vocab["mean"]), np.asarray(model.vocab["std"])
    x, lengths = pad([((r.reshape(len(r), -1) - mean) / std).astype(np.float32) for r in rows], dtype=np.float32)
    if x.ndim == 2:
        x = x[..., None]
    return {"x": x, "lengths": lengths, "y": np.full(len(rows), -1)}


def _load_npy(name: str) -> np.ndarray:
    from pipeline.models.serving import load_npy

    return load_npy(name, f"--file takes .npy files; got {name!r}")


# many_to_many (activity) -----------------------------------------------------------------------------------------


class ManyToManyExplorer(Explorer):
    kind = "series"

    def default_input(self, model, split):
        return _take(split, np.arange(min(2, len(split["x"]))))

    def probe_input(self, model, split, train=None):
        idx = np.arange(min(PROBE_SAMPLES // 4, len(split["x"])))
        return [_take(split, idx[i : i + 32]) for i in range(0, len(idx), 32)]

    def user_input(self, model, split, text, files, index):
        if files:
            arrays = _series_files(model, files)
            arrays["y"] = np.full(arrays["x"].shape[:2], -1)
            return arrays
        return super().user_input(model, split, text, files, index)

    def vocab(self, model):
        return list(model.vocab["labels"])

    def channel_names(self, model):
        return _channel_names(model)

    def samples(self, model, arrays):
        batch = _tensors(arrays)
        with torch.no_grad():
            trace = model.trace(batch)
            logits = model(batch["x"], batch.get("lengths"))
        gates, units = top_layer(trace)
        ids, p = topk(logits)
        labels = model.vocab["labels"]
        out = []
        for b in range(batch["x"].shape[0]):
            n = int(batch["lengths"][b]) if "lengths" in batch else batch["x"].shape[1]
            y = arrays["y"][b, :n]
            known = bool((y >= 0).all())
            accuracy = float((ids[b, :n, 0] == y).mean()) if known else None
            title = f"stream {b}: {n} steps" + (f" · model right on {accuracy:.0%} of steps" if known else "")
            step_labels = [labels[k] for k in y] if known else [""] * n
            change = np.r_[0, np.flatnonzero(np.diff(y)) + 1] if known else np.array([0])
            since = np.arange(n) - change[np.searchsorted(change, np.arange(n), side="right") - 1]
            probes = {"position": _position(n), "steps_since_label_change": since.astype(np.float64),
                      **(_class_probes(labels, y, n) if known else {})}
            values = batch["x"][b, :n].numpy()
            if values.ndim == 3:  # frames (n, H, W): the series of their brightness and centre
                values = _frame_summary(values)
            out.append(Sample(title=title, labels=step_labels, values=values,
                              gates={c: v[b, :n] for c, v in gates.items()}, top_ids=ids[b, :n], top_p=p[b, :n],
                              actual=step_labels, probes=probes))
        return out, units


# seq2seq (translation) --------------------------------------------------------------------------------------


class Seq2SeqExplorer(Explorer):
    takes_text, layer_note = True, ", decoder"

    def vocab(self, model):
        return list(model.vocab["tgt_tokens"])

    def user_input(self, model, split, text, files, index):
        if text is not None:
            from pipeline.text import encode_source

            src = encode_source(text, model.vocab)
            if not src:
                raise PipelineError("--text is empty: give English number words such as 'forty-two'")
            src_t, n = torch.tensor([src]), torch.tensor([len(src)])
            out = model.greedy(src_t, n)[0]
            tgt = [BOS, *out, EOS]  # the decoder reads its own greedy output
            return {"src": src_t.numpy(), "src_lengths": n.numpy(), "tgt": np.asarray([tgt]),
                    "tgt_lengths": np.asarray([len(tgt)])}
        return super().user_input(model, split, text, files, index)

    def samples(self, model, arrays):
        from pipeline.text import tokenizer

        detokenize = tokenizer(model.vocab)[1]  # words joined as written ("quarante-deux"), or characters
        batch = _tensors({k: v for k, v in arrays.items() if k != "numbers"})
        in_lengths = batch["tgt_lengths"] - 1
        with torch.no_grad():
            trace = model.trace(batch)
            logits = model(batch["src"], batch["src_lengths"], batch["tgt"][:, :-1], in_lengths)
            greedy = model.greedy(batch["src"], batch["src_lengths"])
        gates, units = top_layer(trace)
        ids, p = topk(logits)
        src_words, tgt_words = model.vocab["src_tokens"], model.vocab["tgt_tokens"]
        out = []
        for b, n in enumerate(in_lengths.tolist()):
            source = detokenize([src_words[i] for i in batch["src"][b, : int(batch["src_lengths"][b])].tolist()])
            shown = [tgt_words[i] for i in batch["tgt"][b, :n].tolist()]
            said = detokenize([tgt_words[i] for i in greedy[b]])
            out.append(Sample(title=f"{source} → {said}", labels=shown, gates={c: v[b, :n] for c, v in gates.items()},
                              top_ids=ids[b, :n], top_p=p[b, :n],
                              actual=[tgt_words[i] for i in batch["tgt"][b, 1 : n + 1].tolist()],
                              probes={"position": _position(n), "tokens_left": (n - 1 - _position(n))}))
        return out, units


# one_to_one (digits) ----------------------------------------------------------------------------------------


class OneStepExplorer(Explorer):
    """One-step models: a gallery of inputs is the page's one sequence, each input one step (sorted by class,
    so selecting a run of inputs selects a class). Images show as images; a row of features (a table's row)
    as a one-pixel-high strip of its values, scaled over the page."""

    kind = "images"

    def default_input(self, model, split):
        y = split["y"]
        per = max(1, GALLERY // max(1, len(set(y.tolist()))))
        idx = [i for k in sorted(set(y.tolist())) for i in np.flatnonzero(y == k)[:per]]
        return _take(split, idx)

    def probe_input(self, model, split, train=None):
        n = min(len(split["y"]), 4 * PROBE_SAMPLES)
        return [_take(split, np.arange(n))]

    def user_input(self, model, split, text, files, index):
        if files:
            from pipeline.serving_inputs import InputError, images

            stack = []
            for name in files:
                try:
                    stack.append(images(_load_npy(name), model.dims["input_shape"]))
                except InputError as err:
                    raise PipelineError(f"{name}: {err.message}") from None
            x = np.concatenate(stack).astype(np.float32)
            return {"x": x, "y": np.full(len(x), -1)}
        return super().user_input(model, split, text, files, index)

    def vocab(self, model):
        return list(model.vocab["labels"])

    def samples(self, model, arrays):
        batch = _tensors(arrays)
        with torch.no_grad():
            trace = model.trace(batch)
            logits = model(batch["x"])
        gates, units = top_layer(trace)  # (N, 1, U): the N images become the N steps of one sequence
        ids, p = topk(logits)
        labels = model.vocab["labels"]
        y = arrays["y"]
        known = bool((y >= 0).all())
        right = float((ids[:, 0] == y).mean()) if known else None
        title = f"{len(y)} images" + (f", sorted by class · model right on {right:.0%}" if known else "")
        x = batch["x"].reshape(len(y), *model.dims["input_shape"]).numpy()
        if x.ndim == 2:  # features: each row a 1 x F strip, min-max scaled over the page per feature
            lo, hi = x.min(0), x.max(0)
            x = ((x - lo) / np.where(hi > lo, hi - lo, 1.0))[:, None, :]
        return [Sample(title=title, labels=[labels[k] if k >= 0 else "" for k in y],
                       gates={c: v[:, 0] for c, v in gates.items()}, values=x, top_ids=ids, top_p=p,
                       actual=[labels[k] if k >= 0 else "" for k in y],
                       probes=_class_probes(labels, y, len(y)) if known else {})], units


def explorer_for(topology) -> Explorer:
    """The Explorer a topology object names (its `explorer`, "module:Class"); PipelineError if it names none."""
    path = getattr(topology, "explorer", "")
    if not path:
        raise PipelineError(f"topology {getattr(topology, 'name', topology)!r} has no gate explorer "
                            "(its `explorer` names none)")
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)()


def page_kind(explorer: Explorer, model) -> str:
    if isinstance(explorer, ManyToOneExplorer):
        return "tokens" if explorer.is_text(model) else "series"
    return explorer.kind


# --- probes ----------------------------------------------------------------------------------------------------


class Correlator:
    """Pearson correlation of every unit with every probe, accumulated over batches of steps (float64 sums)."""

    def __init__(self):
        self.sums: dict[str, dict[str, np.ndarray | float]] = {}

    def add(self, values: np.ndarray, probes: dict[str, np.ndarray]) -> None:
        """values (T, U); probes name -> (T,), NaN where undefined (those steps are left out for that probe)."""
        values = np.asarray(values, dtype=np.float64)
        for name, y in probes.items():
            y = np.asarray(y, dtype=np.float64)
            ok = np.isfinite(y)
            x, y = values[ok], y[ok]
            s = self.sums.setdefault(name, {"n": 0.0, "x": 0.0, "xx": 0.0, "y": 0.0, "yy": 0.0, "xy": 0.0,
                                            "positive": 0.0})
            s["n"] += len(y)
            s["x"] = s["x"] + x.sum(0)
            s["xx"] = s["xx"] + (x * x).sum(0)
            s["y"] += y.sum()
            s["yy"] += (y * y).sum()
            s["xy"] = s["xy"] + y @ x
            s["positive"] += float((y != 0).sum())

    def result(self) -> dict[str, dict]:
        """name -> {"corr": (U,) array (NaN where a unit or the probe is constant), "steps", "positive"}."""
        out = {}
        for name, s in self.sums.items():
            n = s["n"]
            if n < 2:
                continue
            cov = s["xy"] / n - (s["x"] / n) * (s["y"] / n)
            vx = s["xx"] / n - (s["x"] / n) ** 2
            vy = s["yy"] / n - (s["y"] / n) ** 2
            with np.errstate(invalid="ignore", divide="ignore"):
                r = np.where((vx > 1e-12) & (vy > 1e-12), cov / np.sqrt(np.maximum(vx * vy, 1e-300)), np.nan)
            out[name] = {"corr": np.clip(r, -1, 1), "steps": int(n), "positive": int(s["positive"])}
        return out


def best_units(result: dict[str, dict]) -> dict[str, dict]:
    """Per probe, the unit with the largest |r|: {"unit", "corr" (signed), "steps", "positive"}."""
    best = {}
    for name, res in result.items():
        r = res["corr"]
        if not np.isfinite(r).any():
            continue
        u = int(np.nanargmax(np.abs(r)))
        best[name] = {"unit": u, "corr": float(r[u]), "steps": res["steps"], "positive": res["positive"]}
    return best


def probe_correlations(explorer: Explorer, model, split: dict[str, np.ndarray], train=None) -> dict[str, dict]:
    """Per probe over the probe corpus (see each explorer's `probe_input`): the best unit by |r| of tanh(cell)."""
    acc, units = Correlator(), None
    for arrays in explorer.probe_input(model, split, train):
        samples, units = explorer.samples(model, arrays)
        for s in samples:
            acc.add(np.tanh(s.gates["cell"]), s.probes)
    return best_units(acc.result())


def untrained_like(model, seed: int = 0):
    """A model of the same class and hyper-parameters with fresh (seeded) weights: the probes' control."""
    hp = dict(model.hparams)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fresh = type(model)(**hp)
    return fresh.eval()


# --- the page ----------------------------------------------------------------------------------------------------


def quantize(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(T, U) floats -> uint8 over each column's [lo, hi]: q = round((v - lo) / (hi - lo) * 255)."""
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.clip(np.rint((values - lo) / span * 255.0), 0, 255).astype(np.uint8)


def dequantize(q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    span = np.where(hi > lo, hi - lo, 1.0)
    return lo + q.astype(np.float64) * span / 255.0


class _Blob:
    """Arrays packed into one byte string, each at a 4-byte aligned offset; refs say where and what."""

    def __init__(self):
        self.parts, self.size = [], 0

    def add(self, array: np.ndarray) -> dict:
        array = np.ascontiguousarray(array)
        dtype = {np.dtype(np.uint8): "u8", np.dtype(np.uint16): "u16"}[array.dtype]
        data = array.astype(array.dtype.newbyteorder("<")).tobytes()
        ref = {"offset": self.size, "dtype": dtype, "shape": list(array.shape)}
        pad = (-len(data)) % 4
        self.parts.append(data + b"\0" * pad)
        self.size += len(data) + pad
        return ref

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def _finite(values) -> list[float | None]:
    return [round(float(v), 4) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def page_data(page: Page) -> tuple[dict, bytes]:
    """The JSON header and the (uncompressed) byte blob a page carries; `decode` reverses it."""
    blob = _Blob()
    ranges = {}
    for c in CHANNELS:
        stacked = np.concatenate([s.gates[c] for s in page.samples]).astype(np.float64)
        ranges[c] = {"lo": _finite(stacked.min(0)), "hi": _finite(stacked.max(0))}
    values = [s.values for s in page.samples if s.values is not None and page.kind == "series"]
    vrange = None
    if values:
        stacked = np.concatenate([v.reshape(len(v), -1) for v in values]).astype(np.float64)
        vrange = {"lo": _finite(stacked.min(0)), "hi": _finite(stacked.max(0))}
    samples = []
    for s in page.samples:
        entry = {"title": s.title, "labels": s.labels, "steps": s.steps, "per_step": s.per_step,
                 "gates": {c: blob.add(quantize(s.gates[c].astype(np.float64), np.array(ranges[c]["lo"]),
                                                np.array(ranges[c]["hi"]))) for c in CHANNELS},
                 "probes": {k: _finite(v) for k, v in s.probes.items()}}
        if s.sub is not None:
            entry["sub"] = s.sub
        if s.actual is not None:
            entry["actual"] = s.actual
        if s.top_ids is not None:
            entry["top_ids"] = blob.add(s.top_ids.astype(np.uint16))
            entry["top_p"] = blob.add(np.clip(np.rint(s.top_p * 255), 0, 255).astype(np.uint8))
        if s.picture is not None:
            entry["picture"] = blob.add(np.ascontiguousarray(s.picture, dtype=np.uint8))
        if s.values is not None:
            if page.kind == "series":
                v = s.values.reshape(len(s.values), -1).astype(np.float64)
                entry["values"] = blob.add(quantize(v, np.array(vrange["lo"]), np.array(vrange["hi"])))
            else:  # images in [0, 1]
                entry["values"] = blob.add(np.clip(np.rint(s.values * 255), 0, 255).astype(np.uint8))
        samples.append(entry)
    header = {"task": page.task, "topology": page.topology, "kind": page.kind, "units": page.units,
              "channels": list(CHANNELS), "ranges": ranges, "value_range": vrange, "vocab": page.vocab,
              "channel_names": page.channel_names, "samples": samples, "about": page.about}
    return header, blob.bytes()


def decode(header: dict, blob: bytes, sample: int, name: str) -> np.ndarray:
    """An array of the page back from the blob (what the page's JS does): gates -> floats over their range."""
    s = header["samples"][sample]
    ref = s["gates"][name] if name in CHANNELS else s[name]
    dtype = {"u8": np.uint8, "u16": np.dtype("<u2")}[ref["dtype"]]
    count = int(np.prod(ref["shape"]))
    q = np.frombuffer(blob, dtype=dtype, count=count, offset=ref["offset"]).reshape(ref["shape"])
    if name in CHANNELS:
        r = header["ranges"][name]
        return dequantize(q, np.array(r["lo"], dtype=np.float64), np.array(r["hi"], dtype=np.float64))
    return q


def read_page(path: str | Path) -> tuple[dict, bytes]:
    """(header, blob) of a written page: the inverse of `render` for tests and tools."""
    html = Path(path).read_text(encoding="utf-8")
    header = json.loads(re.search(r'<script id="explorer-header" type="application/json">(.*?)</script>',
                                  html, re.S)[1])
    blob = zlib.decompress(base64.b64decode(re.search(
        r'<script id="explorer-blob" type="text/plain">(.*?)</script>', html, re.S)[1].strip()))
    return header, blob


def render(page: Page) -> str:
    """The page as one HTML string: template, CSS, JS and data inline; nothing it loads comes from a network."""
    header, blob = page_data(page)
    # every "<" escaped (only strings hold one): no "</script>" or "<!--" can end or hide the data early
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    packed = base64.b64encode(zlib.compress(blob, 9)).decode("ascii")
    template = (ASSETS / "explorer.html").read_text(encoding="utf-8")
    title = f"{page.task}: gate explorer"
    return (template.replace("/*CSS*/", (ASSETS / "explorer.css").read_text(encoding="utf-8"))
            .replace("/*JS*/", (ASSETS / "explorer.js").read_text(encoding="utf-8"))
            .replace("{{TITLE}}", title)
            .replace("{{BLOB}}", packed)
            .replace("{{HEADER}}", text))  # last: the user's text inside is never searched for a placeholder


def write_page(page: Page, out: str | Path) -> int:
    """Write the page atomically (a temporary sibling renamed into place); returns its size in bytes."""
    html = render(page).encode("utf-8")
    write_file_atomic(out, html)
    return len(html)


# --- the stage and the CLI ---------------------------------------------------------------------------------------


def build_page(task: str, topology: str, model, explorer: Explorer, arrays: dict[str, np.ndarray],
               about: dict | None = None) -> Page:
    samples, units = explorer.samples(model, arrays)
    if not samples or not any(s.steps for s in samples):
        raise PipelineError(f"{task}: the input has no steps to show")
    hp = model.model_cfg
    facts = {"hidden_size": hp.hidden_size, "num_layers": hp.num_layers,
             "directions": 2 if len(units) > hp.hidden_size else 1,
             "layer_shown": f"top layer ({hp.num_layers - 1}){explorer.layer_note}"}
    return Page(task=task, topology=topology, kind=page_kind(explorer, model), units=units, samples=samples,
                vocab=explorer.vocab(model), channel_names=explorer.channel_names(model), about={**facts,
                                                                                               **(about or {})})


def _load(task_name: str, params: Params, models_root: Path, data_root: Path):
    from pipeline.models.saved import load_trained
    from pipeline.tasks import get_task

    task = get_task(task_name, params)
    model, info = load_trained(models_root / task_name)
    split = load_split(data_root / task_name, task.eval_split)
    return task, model, info, split


def explore(task_name: str, params: Params, *, text: str | None = None, files: list[str] | None = None,
            index: list[int] | None = None, out: str | Path | None = None, models_root: Path = MODELS_ROOT,
            data_root: Path = DATA_ROOT, pages_root: Path = PAGES_ROOT, probes_root: Path = PROBES_ROOT,
            track: bool = True, root: Path | None = None) -> str:
    """The stage (no input given): explorer/<task>.html over held-out samples, probes/<task>.json (best unit per
    probe, its correlation, the untrained control), both logged to the task's MLflow run. With --text, --file
    or --index: a page for that input only, at `out` (default explore-<task>.html), nothing else written."""
    torch.manual_seed(params.seed)
    task, model, info, split = _load(task_name, params, models_root, data_root)
    train = lambda: load_split(data_root / task_name, "train")  # noqa: E731  (read only by explorers that use it)
    explorer = explorer_for(task.topology)
    user = text is not None or bool(files) or index is not None
    page_file = Path(out) if out else Path(f"explore-{task_name}.html") if user else pages_root / f"{task_name}.html"
    probes_file = probes_root / f"{task_name}.json"
    # what could stop the run at its end is checked before anything is computed or written
    check_file_targets(page_file, *([] if user else [probes_file]))
    if not user and track and info.get("mlflow_run_id"):
        from pipeline.tracking import check_run

        check_run(params, info["mlflow_run_id"], root)
    with torch.no_grad():
        if user:
            arrays = explorer.user_input(model, split, text, files, index)
            page = build_page(task_name, task.topology_name, model, explorer, arrays)
            size = write_page(page, page_file)
            return f"{task_name}: {page_file} ({size / 1024:.0f} KiB)"
        probes = probe_correlations(explorer, model, split, train)
        control = probe_correlations(explorer, untrained_like(model, params.seed), split, train)
        metrics = {name: {"corr": round(v["corr"], 4), "unit": v["unit"],
                          "control_corr": round(control[name]["corr"], 4) if name in control else None,
                          "steps": v["steps"], "positive_steps": v["positive"]} for name, v in probes.items()}
        metrics = {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in metrics.items()}
        page = build_page(task_name, task.topology_name, model, explorer, explorer.default_input(model, split),
                          about={"probes": metrics, "split": task.eval_split})
    size = write_page(page, page_file)
    write_file_atomic(probes_file, json.dumps({"probe": metrics}, indent=1) + "\n")
    if track and info.get("mlflow_run_id"):
        log_explorer(params, info["mlflow_run_id"], metrics, page_file, probes_file, root=root)
    best = ", ".join(f"{k} r={v['corr']:+.2f} (unit {page.units[v['unit']]})" for k, v in metrics.items())
    return f"{task_name}: {page_file} ({size / 1024:.0f} KiB); best units: {best}"


def log_explorer(params: Params, run_id: str, metrics: dict, page_file: Path, probes_file: Path,
                 root: Path | None = None) -> None:
    """Into the task's (finished) training run: probe_<name>_corr and _control_corr metrics, the page and the
    probe numbers as artifacts under explorer/ (as evaluation logs its files, without reopening the run)."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import tracking_uri

    client = MlflowClient(tracking_uri(params, root))
    now = int(time.time() * 1000)
    safe = lambda s: re.sub(r"[^0-9A-Za-z_\-. /]", "_", s)  # noqa: E731  (MLflow's metric-name alphabet)
    rows = [Metric(safe(f"probe_{name}_{key}"), float(v[key]), now, 0)
            for name, v in metrics.items() for key in ("corr", "control_corr") if key in v]
    if rows:
        client.log_batch(run_id, metrics=rows)
    for path in (page_file, probes_file):
        client.log_artifact(run_id, str(path), artifact_path="explorer")
