"""The MLflow pyfunc model: rebuilds a trained module from weights + config with this package.

Logged as "models from code" (MLflow 3): this file is the model definition, the weights and
config.json are artifacts, the `pipeline` package travels as code. Nothing is pickled.

predict takes natural inputs, chosen by the model's topology and vocabulary:
  token classifiers (sentiment)  DataFrame with `text`          -> label, probability
  seq2seq (translation)          DataFrame with `text`          -> translation
  char LM (charlm)               DataFrame with `prime` [, `length`, `temperature`, `top_k`, `seed`] -> text
  one_to_many (melody)           DataFrame with `seed` note like "C5|1.0" [, `length`, ...] -> melody
  feature classifiers            array (N, 28, 28) or (N, T, channels), raw units -> label, probability
  per-step labelling (activity)  array (N, T, channels)          -> labels (one per step)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


def _column(frame: pd.DataFrame, name: str, default, n: int) -> list:
    return frame[name].tolist() if name in frame else [default] * n


class RNNPyfunc(PythonModel):
    def load_context(self, context):
        from pipeline.models.saved import load_trained

        self.model, self.info = load_trained(context.artifacts["model"])
        self.vocab = self.info["hparams"]["vocab"]

    def _features(self, x) -> torch.Tensor:
        x = np.asarray(x, dtype=np.float32)
        if "mean" in self.vocab:  # the prepared data were normalised with training statistics
            x = (x - np.asarray(self.vocab["mean"], np.float32)) / np.asarray(self.vocab["std"], np.float32)
        if x.ndim == 2 and self.info["topology"] != "one_to_one":
            x = x[..., None]  # (N, T) -> (N, T, 1): one channel
        return torch.from_numpy(x)

    def _classify(self, logits: torch.Tensor) -> pd.DataFrame:
        probs = torch.softmax(logits, -1)
        best = probs.argmax(-1)
        labels = self.vocab["labels"]
        return pd.DataFrame({"label": [labels[i] for i in best.tolist()],
                             "probability": probs.gather(-1, best[:, None])[:, 0].tolist()})

    @torch.no_grad()
    def predict(self, context, model_input, params=None):
        topology, model = self.info["topology"], self.model
        if topology == "char_lm":
            frame = pd.DataFrame(model_input)
            n = len(frame)
            return pd.DataFrame({"text": [
                model.sample(p, int(length), float(t), None if k is None or k != k else int(k), seed=s)
                for p, length, t, k, s in zip(frame["prime"], _column(frame, "length", 200, n),
                                              _column(frame, "temperature", 0.8, n), _column(frame, "top_k", None, n),
                                              _column(frame, "seed", None, n))]})
        if topology == "seq2seq":
            from pipeline.datasets.translation import detokenize, encode_source

            texts = pd.DataFrame(model_input)["text"].tolist()
            ids = [encode_source(t, self.vocab) or [1] for t in texts]
            src = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
            for row, seq in zip(src, ids):
                row[: len(seq)] = torch.tensor(seq)
            out = model.greedy(src, torch.tensor([len(s) for s in ids]))
            words = self.vocab["tgt_tokens"]
            return pd.DataFrame({"text": texts, "translation": [detokenize([words[i] for i in o]) for o in out]})
        if topology == "one_to_many":
            frame = pd.DataFrame(model_input)
            index = {tok: i for i, tok in enumerate(self.vocab["tokens"])}
            rows = []
            for seed, length, t in zip(frame["seed"], _column(frame, "length", 32, len(frame)),
                                       _column(frame, "temperature", 0.0, len(frame))):
                if seed not in index:
                    raise ValueError(f"unknown seed note {seed!r}; known notes look like {self.vocab['tokens'][2]!r}")
                line = model.generate(torch.tensor([[index[seed]]]), int(length), float(t))[0]
                rows.append(" ".join([seed] + [self.vocab["tokens"][i] for i in line]))
            return pd.DataFrame({"seed": frame["seed"], "melody": rows})
        if "tokens" in self.vocab:  # a token classifier: text in
            from pipeline.datasets.sentiment import encode

            texts = pd.DataFrame(model_input)["text"].tolist()
            ids = [encode(t, self.vocab) for t in texts]
            x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
            for row, seq in zip(x, ids):
                row[: len(seq)] = torch.tensor(seq)
            return self._classify(model(x, torch.tensor([len(s) for s in ids])))
        x = self._features(model_input)
        if topology == "many_to_many":
            labels = self.vocab["labels"]
            return np.asarray(labels)[model(x).argmax(-1).numpy()]  # (N, T) label names
        return self._classify(model(x))


set_model(RNNPyfunc())
