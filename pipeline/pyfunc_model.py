"""The MLflow pyfunc model: rebuilds a trained module from weights + config with this package.

Logged as "models from code" (MLflow 3): this file is the model definition, the weights and
config.json are artifacts, the `pipeline` package travels as code. Nothing is pickled.

predict takes natural inputs, chosen by the model's topology object (its `predict`, in pipeline/models/) and
vocabulary. pipeline/serving_inputs.py holds the checks every contract uses (types, ranges, missing values,
padding, limits); the README's "Serving" section is the user's copy:

  text classifier (sentiment)   `text`                                             -> label, probability,
                                                                                      unknown_share
  translator (translation)      `text`                                             -> text, translation,
                                                                                      unknown_share
  char LM (charlm)              `prime` [, length, temperature, top_k, seed]       -> text
  melody (one_to_many)          `seed` note "C5|1.0" [, length, temperature, top_k, random_seed] -> seed, melody
  image classifier (digits)     images (N, 28, 28) with pixels in [0, 1]           -> label, probability
  series classifier (gesture)   series in raw units, NaN-padded or one per row     -> label, probability, length
  per-step labeller (activity)  series in raw units, NaN-padded or one per row     -> labels (one per step), length

Bad input raises serving_inputs.InputError (HTTP 400 with one line under `mlflow models serve`); a failure
inside the model raises PredictError (HTTP 500, one line; the traceback goes to the log).
"""

from __future__ import annotations

import logging

import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from pipeline import serving_inputs as inputs

log = logging.getLogger(__name__)


class RNNPyfunc(PythonModel):
    """The loaded model (`model`), its config.json (`info`), vocabulary (`vocab`) and topology object
    (`topology`, pipeline/topologies.py), whose `predict` does the work."""

    def load_context(self, context):
        from pipeline.models.saved import load_trained
        from pipeline.topologies import topology_of

        self.model, self.info = load_trained(context.artifacts["model"])
        self.vocab = self.info["hparams"]["vocab"]
        self.topology = topology_of(self.info)
        self.topology.load(self)

    # model_input is a DataFrame for the text and generation models and an array, a list or a DataFrame for
    # the feature models; the hint is MLflow's untyped one (no schema inferred from it, no MLflow check):
    # the contracts in serving_inputs check every input.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            with torch.no_grad():
                return self.topology.predict(self, model_input)
        except inputs.OneLineError:
            raise
        except Exception as err:
            log.exception("predict failed")
            from pipeline.config import first_line

            raise inputs.PredictError(f"the model failed on this input: {type(err).__name__}: "
                                      f"{first_line(err)}") from err


set_model(RNNPyfunc())
