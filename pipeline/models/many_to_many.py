"""many_to_many: a label at every step (activity: per-step labels over a sensor stream).

With `bidirectional`, each step's label also sees the steps after it: fine for offline labelling
of a recorded stream, not for labelling a live stream as it arrives.

Batches: pipeline.batch.FeatureSequenceBatch with y (B, T). Serving: series in raw units -> labels (one per
step), length.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import Tensor

from pipeline.batch import lengths_mask
from pipeline.models import evaluation, serving
from pipeline.models.base import RecurrentModule, core, head, masked_cross_entropy
from pipeline.topologies import Topology


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
        return lengths_mask(batch["lengths"], batch["y"].shape[1])

    def loss_terms(self, batch):
        return masked_cross_entropy(self(batch["x"], batch.get("lengths")), batch["y"], self.step_mask(batch))

    def trace(self, batch):
        return self.lstm(batch["x"], lengths=batch.get("lengths"), return_gates=True)[2]


class ManyToManyTopology(Topology):
    name = "many_to_many"
    model_class = ManyToMany

    def settings(self, inputs: str) -> frozenset[str]:
        return frozenset({"model.bidirectional"})

    def evaluate(self, model, dm, split, plots, samples):
        def predict(batch):
            preds, target, mask = model(batch["x"], batch.get("lengths")).argmax(-1), batch["y"], model.step_mask(batch)
            return (preds[mask], target[mask]) if mask is not None else (preds, target)

        return evaluation.classification(dm, split, plots, predict)

    def predict(self, pyfunc, model_input):
        x, lengths = serving.normalised_series(pyfunc, model_input)
        labels = np.asarray(pyfunc.vocab["labels"], dtype=object)
        best = serving.forward(pyfunc, x, lengths).argmax(-1).numpy()
        return pd.DataFrame({"labels": pd.Series([labels[row[:n]].tolist() for row, n in zip(best, lengths.tolist())],
                                                 dtype=object),
                             "length": pd.Series(lengths.tolist(), dtype=np.int64)})

    def cli_input(self, pyfunc, names, options):
        task = pyfunc.info["task"]
        serving.no_options(task, options)
        return serving.series_rows(pyfunc, task, names)


TOPOLOGY = ManyToManyTopology()
