"""many_to_one: a sequence -> one label, read at each sequence's own last step.

Token sequences (sentiment) go through an embedding; feature sequences (gesture) go in as they
are. Padded batches carry `lengths`, so padding never reaches the label. With `bidirectional`, the
label reads both directions' final states of the last layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.base import RecurrentModule, core, head, masked_cross_entropy, token_embedding


class ManyToOne(RecurrentModule):
    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        super().__init__(vocab, dims, model, train)
        self.embed = token_embedding(len(vocab["tokens"]), self.model_cfg) if "tokens" in vocab else None
        stride = self.model_cfg.frame_stride
        cfg = self.model_cfg
        self.lstm = core(cfg.embedding_dim if self.embed else dims["input_shape"][-1] * stride, cfg,
                         bidirectional=cfg.bidirectional)
        directions = 2 if cfg.bidirectional else 1
        self.head = head(cfg, len(vocab["labels"]), directions * cfg.hidden_size)

    def _inputs(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.embed is not None:
            return self.embed(x), lengths
        k = self.model_cfg.frame_stride
        if k == 1:
            return x, lengths
        # frame stacking: k steps become one step of k x features (a k times shorter recurrence)
        B, T, C = x.shape
        x = F.pad(x, (0, 0, 0, (-T) % k)).reshape(B, -1, k * C)
        return x, None if lengths is None else torch.div(lengths + k - 1, k, rounding_mode="floor")

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        x, lengths = self._inputs(x, lengths)
        _, (h_n, _) = self.lstm(x, lengths=lengths)
        if self.lstm.bidirectional:  # forward direction at the true last step, reverse one at step 0
            return self.head(torch.cat([h_n[-2], h_n[-1]], dim=-1))
        return self.head(h_n[-1])  # the last layer's state at each sequence's true last step

    @staticmethod
    def sequence(batch: dict) -> Tensor:
        return batch["x"] if "x" in batch else batch["tokens"]  # features or token ids

    def loss_terms(self, batch):
        return masked_cross_entropy(self(self.sequence(batch), batch.get("lengths")), batch["y"])

    def trace(self, batch):
        x, lengths = self._inputs(self.sequence(batch), batch.get("lengths"))
        return self.lstm(x, lengths=lengths, return_gates=True)[2]
