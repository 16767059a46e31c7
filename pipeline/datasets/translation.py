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

import re
from collections.abc import Mapping

import numpy as np

from pipeline.config import TranslationData
from pipeline.datasets.common import pad, require_module, source, split_indices
from pipeline.datasets.prepared import Prepared

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = [PAD, UNK, BOS, EOS]
TOKEN = re.compile(r"\w+|[^\w\s]")  # words; every hyphen, comma (any punctuation) on its own
GLUE_BEFORE = set(",.;:!?-")  # no space before these
GLUE_AFTER = {"-"}  # nor after these


def tokenize(text: str) -> list[str]:
    """ "one thousand, two hundred and forty-two" -> [..., "thousand", ",", ..., "forty", "-", "two"]."""
    return TOKEN.findall(text.lower())


def detokenize(tokens: list[str]) -> str:
    """Inverse of tokenize for number words: ["quarante", "-", "deux"] -> "quarante-deux"."""
    out = ""
    for i, tok in enumerate(tokens):
        if i and tok not in GLUE_BEFORE and tokens[i - 1] not in GLUE_AFTER:
            out += " "
        out += tok
    return out


def _index(vocab: Mapping, key: str) -> Mapping[str, int]:
    tokens = vocab.get(key)
    return {tok: i for i, tok in enumerate(tokens)} if isinstance(tokens, list) else vocab


def encode_source(text: str, vocab: Mapping) -> list[int]:
    """English text -> source ids; `vocab` is vocab.json's dict or a ready token -> id map."""
    index = _index(vocab, "src_tokens")
    return [index.get(tok, index[UNK]) for tok in tokenize(text)]


def encode_target(text: str, vocab: Mapping) -> list[int]:
    """French text -> <bos> ids <eos>."""
    index = _index(vocab, "tgt_tokens")
    return [index[BOS], *(index.get(tok, index[UNK]) for tok in tokenize(text)), index[EOS]]


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
    src_index, tgt_index = _index(vocab, "src_tokens"), _index(vocab, "tgt_tokens")
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
