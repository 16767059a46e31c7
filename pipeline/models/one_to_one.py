"""one_to_one: a single input step -> a class (digits: the whole 28x28 image is one step)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.base import RecurrentModule, core, head, masked_cross_entropy
from pipeline.models.randomness import row_uniform


class OneToOne(RecurrentModule):
    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        super().__init__(vocab, dims, model, train)
        self.lstm = core(math.prod(dims["input_shape"]), self.model_cfg)
        self.head = head(self.model_cfg, len(vocab["labels"]))

    def _steps(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], 1, -1)  # (B, 1, features): one step

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self._steps(x))
        return self.head(out[:, -1])

    def shifted(self, x: Tensor) -> Tensor:
        """Each image moved by a random (dy, dx) in [-s, s]^2, zeros shifted in: cheap augmentation.
        In a training step the shift is a function of (seed, epoch, sample index): pipeline.models.randomness."""
        s = self.train_cfg.augment_shift
        B, H, W = x.shape
        padded = F.pad(x, (s, s, s, s))
        dy, dx = (row_uniform(B, 2, x.device) * (2 * s + 1)).long().clamp(max=2 * s).T
        rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]
        cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]
        return padded[torch.arange(B, device=x.device)[:, None, None], rows, cols]

    def loss_terms(self, batch):
        x = batch["x"]
        if self.training and self.train_cfg.augment_shift:
            x = self.shifted(x)
        return masked_cross_entropy(self(x), batch["y"])

    def trace(self, batch):
        return self.lstm(self._steps(batch["x"]), return_gates=True)[2]
