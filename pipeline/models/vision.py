"""What the image tasks' topology variants (captioner.CAPTIONS, frames.VIDEO) need: caption evaluation and
pictures (captions), the frame strip (video), and the input contracts of their served models (an image file in,
a clip in).

captions evaluation (held-out emojis, never seen in training): corpus BLEU-1/2/4 (torchmetrics, word
tokens) of the model's captions (ImageCaptioner.caption, the decoding serving uses too) against the CLDR
names, beside two baselines that see no model:
  nearest neighbour     the caption of the training image nearest in pixel space (squared L2 on 0..255)
  most frequent caption every CLDR name is unique, so the constant caption is the likeliest word chain of
                        the training captions: the commonest first word, then each word's commonest follower,
                        until <eos> is the commonest follower
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

BATCH = 256
GRID = 16  # held-out images in the captions picture


def _caption_texts(arrays: dict, words: list[str]) -> list[str]:
    return [" ".join(words[j] for j in row if j) for row in arrays["words"]]


def most_frequent_caption(captions: list[str]) -> str:
    """The commonest caption when one repeats; otherwise the greedy chain of commonest next words."""
    count = Counter(captions)
    top, n = count.most_common(1)[0]
    if n > 1:
        return top
    follow: dict[str, Counter] = {}
    for caption in captions:
        chain = ["<s>", *caption.split(), "</s>"]
        for a, b in zip(chain, chain[1:]):
            follow.setdefault(a, Counter())[b] += 1
    out, word = [], "<s>"
    while len(out) < 8:
        word = follow[word].most_common(1)[0][0]
        if word == "</s>":
            break
        out.append(word)
    return " ".join(out)


def nearest_captions(train_images: np.ndarray, images: np.ndarray, train_captions: list[str]) -> list[str]:
    """The caption of each image's nearest training image (squared L2 over all pixels)."""
    a = train_images.reshape(len(train_images), -1).astype(np.float32)
    out = []
    for start in range(0, len(images), BATCH):
        b = images[start : start + BATCH].reshape(-1, a.shape[1]).astype(np.float32)
        d = (b * b).sum(1)[:, None] - 2 * b @ a.T + (a * a).sum(1)[None, :]
        out.extend(train_captions[j] for j in d.argmin(1))
    return out


def bleu(hyps: list[str], refs: list[str]) -> dict[str, float]:
    from torchmetrics.text import BLEUScore

    return {f"bleu_{n}": float(BLEUScore(n_gram=n)(hyps, [[r] for r in refs])) for n in (1, 2, 4)}


def generate_captions(model, images: np.ndarray) -> list[str]:
    tokens = model.vocab["tokens"]
    out = []
    for start in range(0, len(images), BATCH):
        rows = model.caption(torch.as_tensor(images[start : start + BATCH]))
        out.extend(" ".join(tokens[i] for i in row) for row in rows)
    return out


def evaluate_captions(model, dm, split: str, out: Path, samples: Path) -> tuple[dict, dict]:
    """Metrics (bleu = BLEU-2, bleu_1, bleu_4, loss per known word), the nearest-neighbour baseline's BLEU (and the
    most frequent caption's, in samples/), captions.tsv and a picture of held-out images with both captions."""
    words = dm.vocab["words"]
    train, test = dm.split("train"), dm.split(split)
    refs, train_refs = _caption_texts(test, words), _caption_texts(train, words)
    hyps = generate_captions(model, test["image"])
    near = nearest_captions(train["image"], test["image"], train_refs)
    constant = most_frequent_caption(train_refs)
    scores, near_scores, const_scores = bleu(hyps, refs), bleu(near, refs), bleu([constant] * len(refs), refs)
    total, count = 0.0, 0
    for batch in dm.loader(split, batch_size=BATCH):
        s, n = model.loss_terms(batch)
        total, count = total + float(s), count + int(n)
    metrics = {"bleu": scores["bleu_2"], "bleu_1": scores["bleu_1"], "bleu_4": scores["bleu_4"],
               "loss": total / max(count, 1),
               "exact_match": float(np.mean([h == r for h, r in zip(hyps, refs)]))}
    baseline = {"name": "nearest training image in pixel space", "bleu": near_scores["bleu_2"],
                "bleu_1": near_scores["bleu_1"], "bleu_4": near_scores["bleu_4"],
                "exact_match": float(np.mean([h == r for h, r in zip(near, refs)]))}
    lines = ["codepoint\temoji\treference\tmodel\tnearest_neighbour"]
    lines += [f"U+{cp:04X}\t{chr(cp)}\t{r}\t{h}\t{n}" for cp, r, h, n in
              zip(test["codepoint"].tolist(), refs, hyps, near)]
    (samples / "captions.tsv").write_text("\n".join(lines) + "\n")
    (samples / "baselines.json").write_text(json.dumps({
        "nearest_neighbour": near_scores, "most_frequent_caption": {"caption": constant, **const_scores}},
        indent=1, ensure_ascii=False) + "\n")
    _caption_grid(test["image"][:GRID], refs[:GRID], hyps[:GRID], near[:GRID], out / "captions.png")
    return metrics, baseline


def _caption_grid(images, refs, hyps, near, path: Path, columns: int = 4) -> None:
    from matplotlib.figure import Figure

    rows = -(-len(images) // columns)
    fig = Figure(figsize=(3.2 * columns, 2.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, r, h, n in zip(axes, images, refs, hyps, near):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(f"true: {r}\nmodel: {h}\nnearest: {n}", fontsize=8, loc="left")
    fig.suptitle("held-out emojis (never in training): CLDR name, the model's caption, nearest training image's name")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def draw_strip(model, dm, split: str, path: Path, clips: int = 3) -> None:
    """Frames of the first held-out clips, each with its true and predicted action (red when they differ)."""
    from matplotlib.figure import Figure

    labels = dm.vocab["labels"]
    arrays = dm.split(split)
    x, y = arrays["x"][:clips], arrays["y"][:clips]
    with torch.no_grad():
        pred = model(torch.as_tensor(x)).argmax(-1).numpy()
    T = x.shape[1]
    fig = Figure(figsize=(0.95 * T, 1.45 * len(x)))
    axes = np.atleast_2d(fig.subplots(len(x), T))
    for i in range(len(x)):
        for t in range(T):
            ax = axes[i, t]
            ax.imshow(x[i, t], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            wrong = pred[i, t] != y[i, t]
            ax.set_title(f"{labels[y[i, t]]}\n{labels[pred[i, t]]}", fontsize=7, color="red" if wrong else "black")
    fig.suptitle("held-out clips: true action (top line) and predicted action (bottom line) at every frame")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# --- input contracts of the served models ------------------------------------------------------------------


def _one_image(value, where: str, size: int) -> np.ndarray:
    from pipeline.config import PipelineError
    from pipeline.datasets.captions import load_image
    from pipeline.serving_inputs import InputError

    if isinstance(value, str):
        try:  # JSON carries no bytes: a base64 string stands for the file's bytes
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{where}: not base64-encoded image bytes (the model reads no file paths: send the "
                             "file's bytes, or base64 text of them)") from None
    if not isinstance(value, (bytes, bytearray)):
        raise InputError(f"{where}: expected an image file's bytes or base64 text; got {type(value).__name__}")
    try:
        return load_image(value, size)
    except PipelineError as err:
        raise InputError(f"{where}: {err}") from None


def caption_inputs(model_input, image_shape) -> np.ndarray:
    """(N, H, W, 3) uint8 images from: a DataFrame (or dict) with a column `image` holding, per row, a PNG/JPEG
    file's bytes or base64 text of them (never a path: served, the model would open files on the server for any
    client; the CLI and the explorer read the user's files and pass their bytes); a list of such values; or an
    array (N, H, W, 3) of 0..255 pixels (one image (H, W, 3) too). InputError (one line, naming the row)
    otherwise."""
    import pandas as pd

    from pipeline.serving_inputs import InputError, at

    height, width, channels = image_shape
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape == (0, 0):  # no rows and so no columns ({"dataframe_records": []}): nothing to caption
            return np.zeros((0, height, width, channels), dtype=np.uint8)
        if list(model_input.columns) != ["image"]:
            got = ", ".join(map(repr, map(str, model_input.columns))) or "none"
            raise InputError(f"expected one column 'image' (image bytes or base64 text per row); got columns {got}")
        model_input = model_input["image"].tolist()
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        x = model_input[None] if model_input.shape == (height, width, channels) else model_input
        if x.ndim != 4 or x.shape[1:] != (height, width, channels):
            raise InputError(f"expected images (N, {height}, {width}, {channels}) with pixels 0..255; "
                             f"got an array of shape {model_input.shape}")
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 255):
            raise InputError("pixel values must be finite and lie in 0..255")
        return np.rint(x).astype(np.uint8)
    if isinstance(model_input, (str, bytes)):
        model_input = [model_input]
    if not isinstance(model_input, (list, tuple, np.ndarray)):
        raise InputError(f"expected images: a column 'image' of images' bytes or base64 text, or an array "
                         f"(N, {height}, {width}, {channels}); got {type(model_input).__name__}")
    out = np.zeros((len(model_input), height, width, channels), dtype=np.uint8)
    for i, value in enumerate(model_input):
        out[i] = _one_image(value, at(i, "image"), height)
    return out


def clip_inputs(model_input, frame_shape, max_frames: int = 10_000) -> list[np.ndarray]:
    """Clips as a list of (T_i, H, W) uint8 arrays (H, W = frame_shape) from: an array (N, T, h, w) or one clip
    (T, h, w), pixels 0..255 (uint8, or numbers in that range), or a list of (T_i, h, w) clips; frames of another
    size are resized (bilinear) to the model's. InputError otherwise."""
    from pipeline.serving_inputs import InputError, at

    height, width = frame_shape
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim == 3:
            model_input = model_input[None]
        if model_input.ndim != 4:
            raise InputError(f"expected clips (N, T, height, width) or one clip (T, height, width); "
                             f"got an array of shape {model_input.shape}")
        model_input = list(model_input)
    if not isinstance(model_input, (list, tuple, np.ndarray)):
        raise InputError(f"expected clips: an array (N, T, {height}, {width}) or a list of (T, {height}, {width}) "
                         f"arrays; got {type(model_input).__name__}")
    out, frames = [], 0
    for i, clip in enumerate(model_input):
        try:
            x = np.asarray(clip, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{at(i)}: the clip is not an array of numbers") from None
        if x.ndim != 3 or len(x) == 0 or min(x.shape[1:]) < 1:
            raise InputError(f"{at(i)}: expected a clip (T >= 1, height, width); got shape {x.shape}")
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 255:
            raise InputError(f"{at(i)}: pixel values must be finite and lie in 0..255")
        frames += len(x)
        if frames > max_frames:
            raise InputError(f"more than {max_frames} frames in one request: send fewer clips per request")
        clip = np.rint(x).astype(np.uint8)
        if clip.shape[1:] != (height, width):  # another frame size: resized (bilinear) to the model's
            from PIL import Image

            clip = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BILINEAR))
                             for f in clip])
        out.append(clip)
    return out
