"""The batch contract: special token ids, the lengths-to-mask step, and one batch type per topology.

Prepared data (data/prepared/<task>/<split>.npz) holds these arrays, first axis the sample; the
DataModule (pipeline.datasets.datamodule.collate) turns a list of sample indices into a batch of
the same names as torch tensors, padded arrays trimmed to their longest member, plus `index`
(the global sample indices, int64 (B,), which training's per-sample randomness keys on).

Special token ids. Id 0 is padding in every token vocabulary that pads (embeddings use
padding_idx=0); what follows depends on the vocabulary's kind:

    token classifiers (many_to_one)   <pad> 0, <unk> 1, words ...
    translators (seq2seq)             <pad> 0, <unk> 1, <bos> 2, <eos> 3, words ...
    sequence generators (one_to_many) <pad> 0, <eos> 1, tokens ...
    char LMs (char_lm)                no specials: id 0 is a character

numpy only: `prepare` imports this module, and must not import torch (`lengths_mask` takes the
array library from its argument).
"""

from __future__ import annotations

from typing import TypedDict

PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<bos>", "<eos>"
PAD = 0  # every padded token vocabulary
UNK = 1  # token classifiers and translators
TRANSLATION_SPECIALS = [PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]
BOS, EOS = TRANSLATION_SPECIALS.index(BOS_TOKEN), TRANSLATION_SPECIALS.index(EOS_TOKEN)  # 2, 3
TEXT_SPECIALS = [PAD_TOKEN, UNK_TOKEN]
SEQUENCE_SPECIALS = [PAD_TOKEN, EOS_TOKEN]
SEQUENCE_EOS = SEQUENCE_SPECIALS.index(EOS_TOKEN)  # 1: the end of a generated sequence (one_to_many)


# length arrays and the padded arrays they describe: the DataModule trims a batch to its longest member
PADDED = {"lengths": ("tokens", "x", "y"), "src_lengths": ("src",), "tgt_lengths": ("tgt",)}


def lengths_mask(lengths, steps: int):
    """(B, steps) bool mask, True on each row's first `lengths[b]` steps: the real (unpadded) positions.

    `lengths` (B,) int: a torch tensor (the mask is a tensor on its device) or a numpy array."""
    if hasattr(lengths, "device"):
        import torch

        return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]
    import numpy as np

    return np.arange(steps)[None, :] < np.asarray(lengths)[:, None]


# --- one batch type per topology (B samples, T/S steps after trimming; every batch also has `index`) -----


class Batch(TypedDict, total=False):
    index: object  # (B,) int64: global sample indices (absent in hand-made batches: torch's RNG is used)


class OneToOneBatch(Batch):
    """one_to_one: one input step per sample."""

    x: object  # (B, *input_shape) float32: an image (28, 28) in [0, 1], or a normalised feature vector (F,)
    y: object  # (B,) int64: index into vocab["labels"]


class TokenSequenceBatch(Batch):
    """many_to_one over token ids (text classifiers)."""

    tokens: object  # (B, T) int64, PAD after each row's length
    lengths: object  # (B,) int64 >= 1
    y: object  # (B,) int64: index into vocab["labels"]


class FeatureSequenceBatch(Batch):
    """many_to_one over feature vectors (series classifiers); many_to_many (y per step)."""

    x: object  # (B, T, C) float32, normalised with vocab["mean"], vocab["std"], zeros after each length
    lengths: object  # (B,) int64 >= 1
    y: object  # many_to_one: (B,) int64; many_to_many: (B, T) int64, one label per step (padding: 0, masked)


class GeneratorBatch(Batch):
    """one_to_many: a sequence started by a seed token, ended by EOS (SEQUENCE_EOS)."""

    tokens: object  # (B, T) int64: seed, ..., EOS, then PAD
    lengths: object  # (B,) int64: tokens before the padding, EOS included


class Seq2SeqBatch(Batch):
    """seq2seq: a source sequence and a target sequence."""

    src: object  # (B, S) int64: source words, no BOS/EOS, PAD after src_lengths
    src_lengths: object  # (B,) int64 >= 0
    tgt: object  # (B, T) int64: BOS words EOS, PAD after tgt_lengths
    tgt_lengths: object  # (B,) int64, counting BOS and EOS


class CharWindowBatch(Batch):
    """char_lm: windows of a character stream (the prepared split is one array `ids`; the DataModule cuts it)."""

    x: object  # (B, block_size) int64: characters t .. t+n-1
    y: object  # (B, block_size) int64: characters t+1 .. t+n

