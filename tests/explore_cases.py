"""Tiny seeded models of every topology with held-out arrays in the prepared-data format: what the gate
explorer's tests build pages from (no training, no data packages: seconds)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models.char_lm import CharLM
from pipeline.models.many_to_many import ManyToMany
from pipeline.models.many_to_one import ManyToOne
from pipeline.models.one_to_many import OneToMany
from pipeline.models.one_to_one import OneToOne
from pipeline.models.seq2seq import Seq2Seq

TEXT = ("FIRST CITIZEN.\nBefore we proceed any further, hear me speak.\n\nALL.\nSpeak, speak. (aside) \"Go\"\n\n"
        "FIRST CITIZEN.\nYou are all resolved rather to die than to famish?\n\n") * 12
CHARS = sorted(set(TEXT))


def _lengths(rng, n, lo, hi):
    return rng.integers(lo, hi + 1, size=n)


def _padded(rng, lengths, fill):
    out = np.zeros((len(lengths), int(lengths.max())), dtype=np.int64)
    for i, n in enumerate(lengths):
        out[i, :n] = fill(int(n))
    return out


def cases() -> dict[str, tuple]:
    """name -> (topology, model in eval mode, held-out split arrays)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    small = {"hidden_size": 8, "embedding_dim": 4}
    out = {}

    index = {c: i for i, c in enumerate(CHARS)}
    out["charlm"] = ("char_lm", CharLM({"chars": CHARS}, {}, small, {}),
                     {"ids": np.array([index[c] for c in TEXT], dtype=np.int64)})

    notes = ["<pad>", "<eos>", "C5|1.0", "D5|0.5", "E-4|1.5", "F#4|1/3", "rest|1.0"]
    lengths = _lengths(rng, 6, 4, 12)
    tokens = _padded(rng, lengths, lambda n: np.r_[rng.integers(2, len(notes), n - 1), 1])
    out["melody"] = ("one_to_many", OneToMany({"tokens": notes}, {}, small, {}),
                     {"tokens": tokens, "lengths": lengths})

    words = ["<pad>", "<unk>", "good", "bad", "film", ".", "not"]
    lengths = _lengths(rng, 8, 3, 10)
    out["sentiment"] = ("many_to_one", ManyToOne({"tokens": words, "labels": ["rotten", "fresh"]}, {}, small, {}),
                        {"tokens": _padded(rng, lengths, lambda n: rng.integers(1, len(words), n)),
                         "lengths": lengths, "y": rng.integers(0, 2, 8)})

    lengths = _lengths(rng, 6, 9, 30)
    x = np.zeros((6, int(lengths.max()), 1), dtype=np.float32)
    for i, n in enumerate(lengths):
        x[i, :n, 0] = np.sin(np.arange(n) / 3.0 + i)
    out["gesture"] = ("many_to_one", ManyToOne({"labels": ["1", "2", "3"], "mean": [0.0], "std": [1.0]},
                                               {"input_shape": [int(lengths.max()), 1]},
                                               {"hidden_size": 6, "frame_stride": 4, "bidirectional": True}, {}),
                      {"x": x, "lengths": lengths, "y": rng.integers(0, 3, 6)})

    src_words = ["<pad>", "<unk>", "<bos>", "<eos>", "one", "two", "hundred", "-"]
    tgt_words = ["<pad>", "<unk>", "<bos>", "<eos>", "un", "deux", "cent", "-"]
    src_len, tgt_len = _lengths(rng, 5, 1, 4), _lengths(rng, 5, 3, 6)
    out["translation"] = ("seq2seq", Seq2Seq({"src_tokens": src_words, "tgt_tokens": tgt_words}, {},
                                             {**small, "attention": True, "bidirectional": True}, {}),
                          {"src": _padded(rng, src_len, lambda n: rng.integers(4, 8, n)), "src_lengths": src_len,
                           "tgt": _padded(rng, tgt_len, lambda n: np.r_[2, rng.integers(4, 8, n - 2), 3]),
                           "tgt_lengths": tgt_len, "numbers": np.arange(5)})

    steps = 40
    out["activity"] = ("many_to_many", ManyToMany({"labels": ["idle", "walk", "run"], "mean": [0.0] * 6,
                                                   "std": [1.0] * 6}, {"input_shape": [steps, 6]},
                                                  {"hidden_size": 6, "bidirectional": True}, {}),
                       {"x": rng.normal(size=(3, steps, 6)).astype(np.float32),
                        "y": np.repeat(rng.integers(0, 3, (3, 4)), steps // 4, axis=1),
                        "lengths": np.full(3, steps)})

    out["digits"] = ("one_to_one", OneToOne({"labels": [str(d) for d in range(10)]}, {"input_shape": [28, 28]},
                                            {"hidden_size": 8}, {}),
                     {"x": rng.random((30, 28, 28)).astype(np.float32), "y": np.repeat(np.arange(10), 3)})
    x = rng.integers(0, 2, (24, 8)).astype(np.float32)  # a table's rows (README's parity task): strips, not images
    out["parity"] = ("one_to_one", OneToOne({"labels": ["even", "odd"]}, {"input_shape": [8]}, {"hidden_size": 8}, {}),
                     {"x": x, "y": (x.sum(1) % 2).astype(np.int64)})
    return {name: (topology, model.eval(), split) for name, (topology, model, split) in out.items()}
