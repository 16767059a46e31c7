"""many_to_one: a sequence -> one label, read at each sequence's own last step.

Token sequences (sentiment) go through an embedding; feature sequences (gesture) go in as they
are. Padded batches carry `lengths`, so padding never reaches the label.
"""

from __future__ import annotations

from torch import Tensor

from pipeline.models.base import RecurrentModule, core, head, masked_cross_entropy, token_embedding


class ManyToOne(RecurrentModule):
    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        super().__init__(vocab, dims, model, train)
        self.embed = token_embedding(len(vocab["tokens"]), self.model_cfg) if "tokens" in vocab else None
        self.lstm = core(self.model_cfg.embedding_dim if self.embed else dims["input_shape"][-1], self.model_cfg)
        self.head = head(self.model_cfg, len(vocab["labels"]))

    def _inputs(self, x: Tensor) -> Tensor:
        return self.embed(x) if self.embed is not None else x

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        _, (h_n, _) = self.lstm(self._inputs(x), lengths=lengths)
        return self.head(h_n[-1])  # the last layer's state at each sequence's true last step

    @staticmethod
    def sequence(batch: dict) -> Tensor:
        return batch["x"] if "x" in batch else batch["tokens"]  # features or token ids

    def loss_terms(self, batch):
        return masked_cross_entropy(self(self.sequence(batch), batch.get("lengths")), batch["y"])

    def trace(self, batch):
        return self.lstm(self._inputs(self.sequence(batch)), lengths=batch.get("lengths"), return_gates=True)[2]
