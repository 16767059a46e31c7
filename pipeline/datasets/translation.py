"""translation: English -> French number words, generated with num2words.

Numbers 0..max_number are split at random (seeded), so no val/test number is seen in
training. Tokens are words, hyphens and commas ("quarante-deux" -> quarante - deux); both
vocabularies come from the training numbers, with <pad> 0, <unk> 1, <bos> 2, <eos> 3.

    src (N, S) int64: English words (no <bos>/<eos>), src_lengths (N,)
    tgt (N, T) int64: <bos> French words <eos>, tgt_lengths (N,) counting <bos> and <eos>
    numbers (N,) int64

`tokenize`, `encode_source` and `detokenize` are what predict uses.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from pipeline.batch import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, TRANSLATION_SPECIALS, UNK_TOKEN
from pipeline.config import SplitData
from pipeline.datasets.common import pad, require_module, source, split_indices
from pipeline.datasets.prepared import Prepared
from pipeline.text import GLUE_AFTER, GLUE_BEFORE, detokenize, encode_source, encode_target  # noqa: F401
from pipeline.text import TRANSLATION_TOKEN as TOKEN  # noqa: F401
from pipeline.text import token_index as _token_index
from pipeline.text import translation_tokenize as tokenize

TOPOLOGY = "seq2seq"  # the topology these data feed (pipeline/topologies.py)


class TranslationData(SplitData):
    inputs: ClassVar[str] = "tokens"
    source: str = "translation"
    max_number: int = Field(9999, gt=10)  # numbers 0..max_number
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)


Data = TranslationData  # the `data` section's schema (pipeline.sources)

PAD, UNK, BOS, EOS = PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN
SPECIALS = TRANSLATION_SPECIALS  # ids 0..3: pipeline.batch's PAD, UNK, BOS, EOS
def build_vocab(texts: list[str]) -> list[str]:
    return SPECIALS + sorted({tok for text in texts for tok in tokenize(text)})


def build(cfg: TranslationData, seed: int) -> Prepared:
    num2words = require_module("num2words", "pip install num2words").num2words
    numbers = np.arange(cfg.max_number + 1, dtype=np.int64)
    english = [num2words(int(n), lang="en") for n in numbers]
    french = [num2words(int(n), lang="fr") for n in numbers]
    rng = np.random.default_rng(seed)
    parts = split_indices(len(numbers), cfg.val_fraction, cfg.test_fraction, rng)
    vocab = {
        "src_tokens": build_vocab([english[i] for i in parts["train"]]),
        "tgt_tokens": build_vocab([french[i] for i in parts["train"]]),
    }
    src_index, tgt_index = _token_index(vocab, "src_tokens"), _token_index(vocab, "tgt_tokens")
    splits = {}
    for split, idx in parts.items():
        src, src_lengths = pad([encode_source(english[i], src_index) for i in idx])
        tgt, tgt_lengths = pad([encode_target(french[i], tgt_index) for i in idx])
        splits[split] = {
            "src": src,
            "src_lengths": src_lengths,
            "tgt": tgt,
            "tgt_lengths": tgt_lengths,
            "numbers": numbers[idx],
        }
    return Prepared(
        splits=splits,
        vocab=vocab,
        source=source(
            "num2words",
            "generated data; num2words is LGPL-2.1",
            f"English and French words for the numbers 0..{cfg.max_number}, written by num2words.",
        ),
        stats={"unit": "numbers"},
    )
