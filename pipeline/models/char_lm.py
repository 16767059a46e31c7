"""The character-level language model: next-character prediction, sampled one character at a time."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.base import masked_cross_entropy
from pipeline.models.one_to_many import OneToMany


class CharLM(OneToMany):
    """Windows of text: x is characters t..t+n-1, y is t+1..t+n. No padding, no <eos>."""

    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        super().__init__(vocab, dims, model, train)
        self.embed = nn.Embedding(self.num_tokens, self.model_cfg.embedding_dim)  # id 0 is a real character

    @property
    def num_tokens(self) -> int:
        return len(self.vocab["chars"])

    def loss_terms(self, batch):
        logits, _ = self(batch["x"])
        return masked_cross_entropy(logits, batch["y"])

    def trace(self, batch):
        return self.lstm(self.embed(batch["x"]), return_gates=True)[2]

    def encode(self, text: str) -> list[int]:
        index = {c: i for i, c in enumerate(self.vocab["chars"])}
        unknown = sorted({c for c in text if c not in index})
        if unknown:
            raise ValueError(f"characters not in the model's vocabulary: {''.join(unknown)!r}")
        return [index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab["chars"][i] for i in ids)

    @torch.no_grad()
    def sample(self, prime: str, length: int, temperature: float = 1.0, top_k: int | None = None,
               seed: int | None = None) -> str:
        """Warm the state on `prime`, then emit `length` characters; temperature -> 0 is greedy."""
        if not prime:
            raise ValueError("the prime must hold at least one character")
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        ids = torch.tensor([self.encode(prime)], device=self.device)
        new = self.generate(ids, length, temperature, top_k, stop_token=None, generator=generator)[0]
        return prime + self.decode(new)
