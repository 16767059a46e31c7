"""chatbot: message -> reply pairs from the Chit Chat Challenge conversations (BYU PCC lab).

`chitchat-dataset` 0.9.0 (MIT) ships them as one `dataset.json` (7,168 conversations, 258,145
messages), read from the installed package without importing it. A conversation is a list of
turns, each turn one or more messages of one speaker; a turn's messages are joined with spaces.
Every pair of consecutive turns (t, t+1) is a (message, reply) pair.

Conversations are split first (seeded, whole conversations per split), so no held-out reply comes
from a conversation seen in training; then each split's pairs are filtered (the reply at most
`max_reply_tokens` tokens: a cut reply would teach the decoder to stop mid-sentence; the message
cut to its last `max_message_tokens`) and subsampled (seeded) to the split's share of `max_pairs`.
The vocabulary (shared by messages and replies, lowercased words, words with inner apostrophes
kept whole, each punctuation mark a token) comes from the training pairs only; <pad> 0, <unk> 1,
<bos> 2, <eos> 3 as in the translation task, so the seq2seq model reads either. Tokenized as the text
classifiers tokenize (pipeline.text.tokenize); detokenized as the translator detokenizes.

    src (N, S) int64: message tokens (no <bos>/<eos>), src_lengths (N,) >= 1
    tgt (N, T) int64: <bos> reply tokens <eos>, tgt_lengths (N,) counting <bos> and <eos>
    conversation (N,) int64: the conversation's index in the file's sorted conversation ids

`encode_message` is what predict uses; it cuts a message to the vocab's `max_message_tokens`, as here,
and writes at most `max_reply_tokens`. The chatbot's evaluation and serving (its topology VARIANT):
pipeline/models/dialogue.py.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
from pydantic import Field

from pipeline.batch import BOS_TOKEN as BOS
from pipeline.batch import EOS_TOKEN as EOS
from pipeline.batch import TRANSLATION_SPECIALS as SPECIALS
from pipeline.batch import UNK_TOKEN as UNK
from pipeline.config import PipelineError, SplitData
from pipeline.datasets.common import package_dir, pad, source, split_indices, subsample
from pipeline.datasets.prepared import Prepared
from pipeline.text import tokenize

TOPOLOGY = "seq2seq"  # the topology these data feed (pipeline/topologies.py)
VARIANT = "pipeline.models.dialogue:CHATBOT"  # its evaluation (perplexity, distinct-n) and serving (message -> reply)


class ChatbotData(SplitData):
    inputs: ClassVar[str] = "tokens"
    source: str = "chatbot"
    # conversations are split first (whole conversations per split), then each split's message -> reply pairs
    # are subsampled to its share of max_pairs
    max_pairs: int = Field(12500, gt=0)
    max_message_tokens: int = Field(16, gt=0)  # a longer message keeps its last tokens
    max_reply_tokens: int = Field(10, gt=0)  # longer replies are left out (a cut reply would teach cut replies)
    min_count: int = Field(2, ge=1)  # rarer words map to <unk>
    max_vocab: int = Field(1000, gt=4)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)


Data = ChatbotData  # the `data` section's schema (pipeline.sources)
PIP = "pip install chitchat-dataset==0.9.0"
FILE = "dataset.json"


def token_index(vocab: Mapping) -> Mapping[str, int]:
    """token -> id from vocab.json's dict ({"tgt_tokens": [...]}) or an index already built."""
    tokens = vocab.get("tgt_tokens")
    return {tok: i for i, tok in enumerate(tokens)} if isinstance(tokens, list) else vocab


def encode_message(text: str, vocab: Mapping, max_tokens: int | None = None) -> list[int]:
    """Message ids (unknown words -> <unk>), cut to its last `max_tokens`; [] for a text without tokens."""
    index = token_index(vocab)
    ids = [index.get(tok, index[UNK]) for tok in tokenize(text)]
    return ids[-max_tokens:] if max_tokens else ids


def read_conversations() -> list[list[str]]:
    """Every conversation as its list of turns (a turn's messages joined), ordered by conversation id."""
    path = package_dir("chitchat_dataset", PIP, name="chitchat-dataset") / FILE
    if not path.is_file():
        raise PipelineError(f"{path} not found: not chitchat-dataset 0.9.0? {PIP}")
    with path.open(encoding="utf-8") as f:
        raw = json.load(f)
    return [[" ".join(" ".join(m["text"].split()) for m in turn) for turn in raw[key]["messages"]]
            for key in sorted(raw)]


def pairs_of(conversations: list[list[str]], chosen, cfg: ChatbotData) -> list[tuple[list[str], list[str], int]]:
    """(message tokens cut to the last max_message_tokens, reply tokens, conversation index) of the chosen
    conversations, in file order; pairs with an empty side or a reply over max_reply_tokens left out."""
    out = []
    for c in chosen:
        turns = [tokenize(t) for t in conversations[c]]
        for message, reply in zip(turns, turns[1:]):
            if message and reply and len(reply) <= cfg.max_reply_tokens:
                out.append((message[-cfg.max_message_tokens:], reply, int(c)))
    return out


def build_vocab(texts: list[list[str]], min_count: int, max_vocab: int) -> list[str]:
    counts = Counter(tok for toks in texts for tok in toks)
    common = sorted((tok for tok, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return [*SPECIALS, *common[: max_vocab - len(SPECIALS)]]


def build(cfg: ChatbotData, seed: int) -> Prepared:
    conversations = read_conversations()
    rng = np.random.default_rng(seed)
    parts = split_indices(len(conversations), cfg.val_fraction, cfg.test_fraction, rng)
    share = {"train": 1 - cfg.val_fraction - cfg.test_fraction, "val": cfg.val_fraction, "test": cfg.test_fraction}
    chosen = {}
    for split in ("train", "val", "test"):
        pairs = pairs_of(conversations, parts[split], cfg)
        keep = subsample(len(pairs), max(1, round(cfg.max_pairs * share[split])), rng)
        chosen[split] = [pairs[i] for i in keep]
    train = chosen["train"]
    tokens = build_vocab([m for m, _, _ in train] + [r for _, r, _ in train], cfg.min_count, cfg.max_vocab)
    index = token_index({"tgt_tokens": tokens})
    unk = index[UNK]
    splits, unk_rate = {}, {}
    for split, pairs in chosen.items():
        src, src_lengths = pad([[index.get(t, unk) for t in m] for m, _, _ in pairs])
        tgt, tgt_lengths = pad([[index[BOS], *(index.get(t, unk) for t in r), index[EOS]] for _, r, _ in pairs])
        splits[split] = {"src": src, "src_lengths": src_lengths, "tgt": tgt, "tgt_lengths": tgt_lengths,
                         "conversation": np.array([c for _, _, c in pairs], dtype=np.int64)}
        real = tgt[:, 1:][tgt[:, 1:] > 0]
        unk_rate[split] = round(float((real == unk).mean()), 4) if len(real) else 0.0
    return Prepared(
        splits=splits,
        vocab={"src_tokens": tokens, "tgt_tokens": tokens, "max_message_tokens": cfg.max_message_tokens,
               "max_reply_tokens": cfg.max_reply_tokens},
        source=source(
            "chitchat-dataset",
            "MIT (chitchat-dataset, BYU PCC lab's Chit Chat Challenge)",
            "Message -> reply pairs of consecutive turns in the Chit Chat Challenge conversations "
            "(chitchat_dataset/dataset.json).",
        ),
        stats={"unit": "message-reply pairs", "reply_unk_rate": unk_rate,
               "conversations": {s: int(len(np.unique(a["conversation"]))) for s, a in splits.items()},
               "conversations_in_file": len(conversations)},
    )
