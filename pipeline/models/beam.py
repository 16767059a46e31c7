"""Beam search for any autoregressive decoder (captions today; seq2seq and chatbot decoders can use it as is).

The decoder is reached through two callables, so this module knows nothing about LSTMs, attention or images:

    step(tokens (N,) int64, state) -> (log_probs (N, V) float, state)   one decoding step for N rows
    reorder(state, index (M,) int64) -> state                           the state's rows `index`, in that order

`state` is whatever the decoder carries (an LSTM's (h, c) has its batch on dim 1, image features or encoder
outputs on dim 0): only `reorder` looks inside it.

Search: each of the B inputs keeps `beam_size` hypotheses. At every step each live hypothesis is extended by
every allowed token, and the `beam_size` best extensions by length-normalized score survive; a hypothesis that
emitted <eos> is finished and stays in the beam unchanged, competing with the live ones. After `max_length`
tokens only <eos> is allowed. The answer is the finished hypothesis of highest length-normalized score

    score(y) = sum_t log p(y_t | y_<t, x) / |y| ** length_penalty        (|y| counts the tokens with <eos>)

(Wu et al. 2016, "Google's neural machine translation system", use ((5 + |y|) / 6) ** alpha; the plain power
is the form of Murray & Chiang 2018). length_penalty 0 ranks by total log-probability, which favours short
outputs; 1 ranks by the mean per token. beam_size 1 is greedy decoding, whatever length_penalty is. A beam
wide enough to hold every hypothesis (beam_size >= V ** max_length) is exhaustive search.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


def normalized(total: Tensor, length: Tensor, length_penalty: float) -> Tensor:
    """Length-normalized scores: total log-probability / length ** length_penalty (lengths >= 1)."""
    return total / length.to(total.dtype).clamp(min=1) ** length_penalty


@torch.no_grad()
def beam_search(step: Callable[[Tensor, Any], tuple[Tensor, Any]], reorder: Callable[[Any, Tensor], Any],
                state: Any, batch_size: int, start_token: int, eos_token: int, beam_size: int, max_length: int,
                length_penalty: float = 0.0, banned: Iterable[int] = ()) -> list[list[int]]:
    """The best sequence for each of `batch_size` inputs, without <eos>, at most `max_length` tokens.

    state: the decoder's state for the batch_size inputs (before reading `start_token`). banned: token ids
    never emitted (<pad>, <unk>). ValueError on beam_size < 1, max_length < 0 or length_penalty < 0.
    Cost: (max_length + 1) decoder steps on batch_size * beam_size rows, fewer when every beam has finished.
    """
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a whole number >= 1, got {beam_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 0:
        raise ValueError(f"max_length must be a whole number >= 0, got {max_length!r}")
    if not length_penalty >= 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty!r}")
    B, K = batch_size, beam_size
    banned = sorted(set(banned))
    rows = torch.arange(B).repeat_interleave(K)  # row b * K + k: hypothesis k of input b
    state = reorder(state, rows)
    tokens = torch.full((B * K,), start_token, dtype=torch.long)
    total = torch.zeros(B, K, dtype=torch.float64)
    total[:, 1:] = float("-inf")  # all hypotheses start equal: keep one until the first step fans out
    length = torch.zeros(B, K, dtype=torch.long)
    done = torch.zeros(B, K, dtype=torch.bool)
    history = torch.zeros(B, K, 0, dtype=torch.long)
    for t in range(max_length + 1):
        log_probs, state = step(tokens, state)
        log_probs = log_probs.to(torch.float64).reshape(B, K, -1).clone()
        V = log_probs.shape[-1]
        if banned:
            log_probs[..., banned] = float("-inf")
        if t == max_length:  # the length limit: nothing but <eos>
            log_probs[..., torch.arange(V) != eos_token] = float("-inf")
        # a finished hypothesis continues as itself only: one candidate (its <eos> slot) adding nothing
        log_probs[done] = float("-inf")
        log_probs[..., eos_token][done] = 0.0
        cand = total[..., None] + log_probs  # (B, K, V)
        cand_len = (length + (~done).long())[..., None].expand(-1, -1, V)
        rank = normalized(cand, cand_len, length_penalty).masked_fill(cand == float("-inf"), float("-inf"))
        best = rank.reshape(B, K * V).topk(K, dim=1).indices  # (B, K); ties: the lower index (earlier beam)
        beam, token = best // V, best % V
        total = cand.reshape(B, -1).gather(1, best)
        length = cand_len.reshape(B, -1).gather(1, best)
        was_done = done.gather(1, beam)
        done = was_done | (token == eos_token)
        history = torch.cat([history.gather(1, beam[..., None].expand(-1, -1, history.shape[-1])),
                             token.masked_fill(was_done, eos_token)[..., None]], -1)
        if bool(done.all()):
            break
        index = (torch.arange(B)[:, None] * K + beam).reshape(-1)
        state = reorder(state, index)
        tokens = token.reshape(-1)
    final = normalized(total, length, length_penalty).masked_fill(~done, float("-inf"))
    pick = final.argmax(1)
    out = []
    for b, k in enumerate(pick.tolist()):
        seq = history[b, k].tolist()
        out.append(seq[: seq.index(eos_token)] if eos_token in seq else seq)
    return out
