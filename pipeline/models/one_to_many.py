"""one_to_many: a seed token -> a sequence (melody: the first note -> the rest of the line).

Trained with teacher forcing (step t sees the true token t and predicts t+1); generation feeds
the model's own choice back in, one token at a time, until <eos> or a length limit. The char
LM is the same autoregressive machine over a continuous stream, so it subclasses this one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.models.base import RecurrentModule, core, head, masked_cross_entropy, pick_token, token_embedding

EOS = 1  # prepared token vocabularies: 0 <pad>, 1 <eos>


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

        Temperature 0 is greedy. Returns each sequence's new tokens, cut before `stop_token`."""
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
