"""one_to_one: a single input step -> a class (digits: the whole 28x28 image is one step)."""

from __future__ import annotations

import math

from torch import Tensor

from pipeline.models.base import RecurrentModule, core, head, masked_cross_entropy


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

    def loss_terms(self, batch):
        return masked_cross_entropy(self(batch["x"]), batch["y"])

    def trace(self, batch):
        return self.lstm(self._steps(batch["x"]), return_gates=True)[2]
