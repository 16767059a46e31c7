"""many_to_many: a label at every step (activity: per-step labels over a sensor stream).

With `bidirectional`, each step's label also sees the steps after it: fine for offline labelling
of a recorded stream, not for labelling a live stream as it arrives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.models.base import RecurrentModule, core, head, masked_cross_entropy


class ManyToMany(RecurrentModule):
    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        super().__init__(vocab, dims, model, train)
        cfg = self.model_cfg
        self.lstm = core(dims["input_shape"][-1], cfg, bidirectional=cfg.bidirectional)
        self.head = head(cfg, len(vocab["labels"]), (2 if cfg.bidirectional else 1) * cfg.hidden_size)

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
