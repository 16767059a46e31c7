"""one_to_many: a seed token -> a sequence (melody: the first note -> the rest of the line).

Trained with teacher forcing (step t sees the true token t and predicts t+1); generation feeds
the model's own choice back in, one token at a time, until <eos> or a length limit. The char
LM is the same autoregressive machine over a continuous stream, so it subclasses this one.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from numbers import Integral, Real

import torch
from torch import Tensor

from pipeline.models.base import RecurrentModule, core, head, masked_cross_entropy, token_embedding

EOS = 1  # prepared token vocabularies: 0 <pad>, 1 <eos>


def check_sampling(length: int, temperature: float, top_k: int | None) -> None:
    """ValueError (one line) unless length is a whole number >= 0, temperature a finite number >= 0
    (0 = greedy) and top_k None or a whole number >= 1 (a top_k at or above the vocabulary cuts nothing)."""
    if isinstance(length, bool) or not isinstance(length, Integral) or length < 0:
        raise ValueError(f"length must be a whole number >= 0, got {length!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
        raise ValueError(f"top_k must be a whole number >= 1 (or None: no cut), got {top_k!r}")


@contextmanager
def one_thread():
    """Torch's intra-op threads set to 1 for a block, then put back. Generation runs one token at a time on tiny
    tensors, where a second thread only adds synchronisation: with the other core busy, a char LM step took
    1.9 ms on one thread and 23 ms on two (process-wide setting: a concurrent block may see it)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def pick_token(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """Next token from (B, V) logits: the argmax at temperature 0, else a draw from softmax(logits / T)
    restricted to the top_k largest logits (ties at the k-th value stay in).

    Computed as softmax((logits - max) / T) in float64: every scaled logit is <= 0 and the largest is exactly 0,
    so any T > 0, down to the smallest double (1e-40, 5e-324), gives a valid distribution that tends to the
    argmax (ties share it) as T -> 0, where logits / T in float32 overflowed to inf - inf = NaN below ~1e-38."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.double()
    scaled = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(-1)


class OneToMany(RecurrentModule):
    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        super().__init__(vocab, dims, model, train)
        self.embed = token_embedding(self.num_tokens, self.model_cfg)
        self.lstm = core(self.model_cfg.embedding_dim, self.model_cfg)
        self.head = head(self.model_cfg, self.num_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.vocab["tokens"])

    def forward(self, tokens: Tensor, state=None, lengths: Tensor | None = None):
        out, state = self.lstm(self.embed(tokens), state, lengths=lengths)
        return self.head(out), state

    def teacher_forcing(self, batch) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs, targets, mask): input token t predicts token t+1, up to each <eos>."""
        tokens, lengths = batch["tokens"], batch["lengths"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = torch.arange(targets.shape[1], device=tokens.device)[None, :] < (lengths[:, None] - 1)
        return inputs, targets, mask

    def loss_terms(self, batch):
        inputs, targets, mask = self.teacher_forcing(batch)
        logits, _ = self(inputs, lengths=(batch["lengths"] - 1).clamp(min=1))
        return masked_cross_entropy(logits, targets, mask)

    def trace(self, batch):
        inputs, _, _ = self.teacher_forcing(batch)
        return self.lstm(self.embed(inputs), lengths=(batch["lengths"] - 1).clamp(min=1), return_gates=True)[2]

    @torch.no_grad()
    def generate(self, prime: Tensor, length: int, temperature: float = 1.0, top_k: int | None = None,
                 stop_token: int | None = EOS, generator: torch.Generator | None = None) -> list[list[int]]:
        """Warm the state on `prime` (B, P), then emit up to `length` tokens one at a time.

        Temperature 0 is greedy; see `pick_token` and `check_sampling` (ValueError on a negative length, a
        temperature that is negative, NaN or infinite, a top_k below 1). Returns each sequence's new tokens,
        cut before `stop_token`. Cost: one recurrent step per token (no cap here: serving caps the length)."""
        check_sampling(length, temperature, top_k)
        with one_thread():
            logits, state = self(prime)
            last = logits[:, -1]
            emitted, done = [], torch.zeros(prime.shape[0], dtype=torch.bool, device=prime.device)
            for _ in range(length):
                token = pick_token(last, temperature, top_k, generator)
                emitted.append(token)
                if stop_token is not None:
                    done |= token == stop_token
                    if bool(done.all()):
                        break
                logits, state = self(token[:, None], state)
                last = logits[:, -1]
        rows = torch.stack(emitted, 1).tolist() if emitted else [[] for _ in range(prime.shape[0])]
        if stop_token is not None:
            rows = [row[: row.index(stop_token)] if stop_token in row else row for row in rows]
        return rows
