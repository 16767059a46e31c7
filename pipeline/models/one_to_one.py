"""one_to_one: a single input step -> a class (digits: the whole 28x28 image is one step; a tabular row).

Batches: pipeline.batch.OneToOneBatch. Serving: images (N, *input_shape) with pixels in [0, 1], or, for a
tabular model (vocab["features"]), a table of those feature columns in raw units -> label, probability."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import serving_inputs as inputs
from pipeline.models import evaluation, serving
from pipeline.models.base import RecurrentModule, core, head, masked_cross_entropy
from pipeline.models.randomness import row_uniform
from pipeline.topologies import Topology


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


class OneToOneTopology(Topology):
    name = "one_to_one"
    model_class = OneToOne

    def settings(self, inputs: str) -> frozenset[str]:
        return frozenset({"train.augment_shift"}) if inputs == "images" else frozenset()

    def evaluate(self, model, dm, split, plots, samples):
        return evaluation.classification(dm, split, plots, lambda batch: (model(batch["x"]).argmax(-1), batch["y"]))

    def predict(self, pyfunc, model_input):
        vocab = pyfunc.vocab
        if "features" in vocab:  # a table: raw units, normalised as in training
            x = inputs.features(model_input, vocab["features"])
            x = ((x - np.asarray(vocab["mean"])) / np.asarray(vocab["std"])).astype(np.float32)
        else:
            x = inputs.images(model_input, pyfunc.info["hparams"]["dims"]["input_shape"])
        return serving.classify(pyfunc, serving.forward(pyfunc, torch.from_numpy(x)))

    def cli_input(self, pyfunc, names, options):
        """A .npy file holds one input (an image (28, 28) or (784,), a feature row (F,)) or a stack of them;
        a tabular model also takes .csv files with a header of its feature columns."""
        from pipeline.config import PipelineError

        task = pyfunc.info["task"]
        serving.no_options(task, options)
        shape = tuple(pyfunc.info["hparams"]["dims"]["input_shape"])
        if "features" in pyfunc.vocab and names and all(n.endswith(".csv") for n in names):
            import pandas as pd

            return pd.concat([_read_csv(n) for n in names], ignore_index=True)
        rows = []
        for name, x in serving.npy_files(names, task):
            one = (shape, (math.prod(shape),))
            if x.shape in one:
                rows.append(x.reshape(shape))
            elif x.ndim >= 2 and x.shape[1:] in one:
                rows.extend(x.reshape(-1, *shape))
            else:
                what = "feature row" if "features" in pyfunc.vocab else "image"
                raise PipelineError(f"{name}: an array of shape {x.shape} is not one {what} {shape} or a stack "
                                    f"(N, {', '.join(map(str, shape))})")
        return rows


def _read_csv(name: str):
    import pandas as pd

    from pipeline.config import PipelineError, first_line

    try:
        return pd.read_csv(name)
    except Exception as err:
        raise PipelineError(f"{name}: not a readable CSV ({first_line(err)})") from None


TOPOLOGY = OneToOneTopology()
