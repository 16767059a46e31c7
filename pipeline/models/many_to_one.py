"""many_to_one: a sequence -> one label, read at each sequence's own last step.

Token sequences (sentiment) go through an embedding; feature sequences (gesture) go in as they
are. Padded batches carry `lengths`, so padding never reaches the label. With `bidirectional`, the
label reads both directions' final states of the last layer.

Batches: pipeline.batch.TokenSequenceBatch (token models: vocab["tokens"]) or FeatureSequenceBatch.
Serving: texts (column `text`) -> label, probability, unknown_share; or series in raw units -> label,
probability, length.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import serving_inputs as inputs
from pipeline.models import evaluation, serving
from pipeline.models.base import RecurrentModule, core, head, masked_cross_entropy, token_embedding
from pipeline.topologies import Topology


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

    def sequence(self, batch: dict) -> Tensor:
        """The batch's input sequence: `tokens` for a token model (it has an embedding), `x` for features."""
        return batch["tokens"] if self.embed is not None else batch["x"]

    def loss_terms(self, batch):
        return masked_cross_entropy(self(self.sequence(batch), batch.get("lengths")), batch["y"])

    def trace(self, batch):
        x, lengths = self._inputs(self.sequence(batch), batch.get("lengths"))
        return self.lstm(x, lengths=lengths, return_gates=True)[2]


class ManyToOneTopology(Topology):
    name = "many_to_one"
    model_class = ManyToOne

    def settings(self, inputs: str) -> frozenset[str]:
        return frozenset({"model.bidirectional", "model.embedding_dim" if inputs == "tokens" else "model.frame_stride"})

    def evaluate(self, model, dm, split, plots, samples):
        return evaluation.classification(
            dm, split, plots, lambda batch: (model(model.sequence(batch), batch.get("lengths")).argmax(-1), batch["y"]))

    def heatmap_labels(self, batch, vocab):
        return [vocab["tokens"][i] for i in batch["tokens"][0].tolist()] if "tokens" in vocab else None

    def input_example(self, info, source_example):
        if source_example is None and "tokens" in info["hparams"]["vocab"]:
            return pd.DataFrame({"text": ["a gripping, beautifully acted film", "dull and lifeless"]})
        return super().input_example(info, source_example)

    def predict(self, pyfunc, model_input):
        if "tokens" in pyfunc.vocab:
            return self._texts(pyfunc, model_input)
        x, lengths = serving.normalised_series(pyfunc, model_input)
        out = serving.classify(pyfunc, serving.forward(pyfunc, x, lengths))
        out["length"] = pd.Series(lengths.tolist(), dtype=np.int64)
        return out

    def _texts(self, pyfunc, model_input) -> pd.DataFrame:
        """A text with no word the model knows (an empty text too) gets label and probability None."""
        from pipeline.batch import UNK_TOKEN
        from pipeline.text import token_index, tokenize

        texts = inputs.texts(model_input)
        index = token_index(pyfunc.vocab)
        unk = index[UNK_TOKEN]
        ids = [[index.get(tok, unk) for tok in tokenize(t)] for t in texts]
        shares = [serving.unknown_share(s, unk) for s in ids]
        answer = [i for i, (s, share) in enumerate(zip(ids, shares)) if s and share < 1]
        labels: list[str | None] = [None] * len(texts)
        probabilities: list[float | None] = [None] * len(texts)
        if answer:
            found = serving.classify(pyfunc, pyfunc.model(*serving.padded([ids[i] for i in answer])))
            for i, label, p in zip(answer, found["label"], found["probability"]):
                labels[i], probabilities[i] = label, p
        return pd.DataFrame({"label": pd.Series(labels, dtype=object),
                             "probability": pd.Series(probabilities, dtype=object),
                             "unknown_share": pd.Series(shares, dtype=np.float64)})

    def cli_input(self, pyfunc, names, options):
        """Texts for a token model; else .npy files of series (serving.series_rows)."""
        task = pyfunc.info["task"]
        serving.no_options(task, options)
        if "tokens" in pyfunc.vocab:
            return pd.DataFrame({"text": names})
        return serving.series_rows(pyfunc, task, names)


TOPOLOGY = ManyToOneTopology()
