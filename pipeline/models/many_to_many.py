"""many_to_many: a label at every step (activity: per-step labels over a sensor stream)."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.models.base import RecurrentModule, core, head, masked_cross_entropy


class ManyToMany(RecurrentModule):
    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        super().__init__(vocab, dims, model, train)
        self.lstm = core(dims["input_shape"][-1], self.model_cfg)
        self.head = head(self.model_cfg, len(vocab["labels"]))

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        out, _ = self.lstm(x, lengths=lengths)
        return self.head(out)  # (B, T, classes)

    def step_mask(self, batch) -> Tensor | None:
        if "lengths" not in batch:
            return None
        T = batch["y"].shape[1]
        return torch.arange(T, device=batch["y"].device)[None, :] < batch["lengths"][:, None]

    def loss_terms(self, batch):
        return masked_cross_entropy(self(batch["x"], batch.get("lengths")), batch["y"], self.step_mask(batch))

    def trace(self, batch):
        return self.lstm(batch["x"], lengths=batch.get("lengths"), return_gates=True)[2]
