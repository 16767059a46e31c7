"""The MLflow pyfunc model: rebuilds a trained module from weights + config with this package.

Logged as "models from code" (MLflow 3): this file is the model definition, the weights and
config.json are artifacts, the `pipeline` package travels as code. Nothing is pickled.

predict takes natural inputs, chosen by the model's topology and vocabulary. pipeline/serving_inputs.py holds
each input contract (types, ranges, missing values, padding, limits); the README's "Serving" section is the
user's copy:

  text classifier (sentiment)   `text`                                             -> label, probability,
                                                                                      unknown_share
  translator (translation)      `text`                                             -> text, translation,
                                                                                      unknown_share
  char LM (charlm)              `prime` [, length, temperature, top_k, seed]       -> text
  melody (one_to_many)          `seed` note "C5|1.0" [, length, temperature, top_k, random_seed] -> seed, melody
  image classifier (digits)     images (N, 28, 28) with pixels in [0, 1]           -> label, probability
  series classifier (gesture)   series in raw units, NaN-padded or one per row     -> label, probability, length
  per-step labeller (activity)  series in raw units, NaN-padded or one per row     -> labels (one per step), length
  captioner (captions)          `image`: PNG/JPEG path, bytes or base64; or pixels -> caption
  frame labeller (video)        clips (N, T, H, W) or a list of (T_i, H, W), 0..255 -> actions (one per frame), length

Bad input raises serving_inputs.InputError (HTTP 400 with one line under `mlflow models serve`); a failure
inside the model raises PredictError (HTTP 500, one line; the traceback goes to the log).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from pipeline import serving_defaults as defaults
from pipeline import serving_inputs as inputs

log = logging.getLogger(__name__)


class RNNPyfunc(PythonModel):
    def load_context(self, context):
        from pipeline.models.saved import load_trained

        self.model, self.info = load_trained(context.artifacts["model"])
        self.vocab = self.info["hparams"]["vocab"]
        self.kind = inputs.kind_of(self.info)

    # model_input is a DataFrame for the text and generation models and an array, a list or a DataFrame for
    # the feature models; the hint is MLflow's untyped one (no schema inferred from it, no MLflow check):
    # the contracts in serving_inputs check every input.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            with torch.no_grad():
                return getattr(self, f"_{self.kind}")(model_input)
        except inputs.OneLineError:
            raise
        except Exception as err:
            log.exception("predict failed")
            from pipeline.config import first_line

            raise inputs.PredictError(f"the model failed on this input: {type(err).__name__}: "
                                      f"{first_line(err)}") from err

    # --- generators -------------------------------------------------------------------------------------

    def _charlm(self, model_input) -> pd.DataFrame:
        known = set(self.vocab["chars"])

        def prime(value, where: str) -> str:
            value = inputs.text(value, where)
            if not value:
                raise inputs.InputError(f"{where}: empty; the prime needs at least one character")
            unknown = sorted(set(value) - known)
            if unknown:
                raise inputs.InputError(f"{where}: characters the model does not know: {''.join(unknown)!r}")
            return value

        _, rows = inputs.generations(model_input, prime="prime", seed="seed", defaults=defaults.CHARLM,
                                     cap=defaults.MAX_CHARS, unit="characters", check_prime=prime)
        return pd.DataFrame({"text": pd.Series(
            [self.model.sample(r.prime, r.length, r.temperature, r.top_k, seed=r.seed) for r in rows],
            dtype=object)})

    def _melody(self, model_input) -> pd.DataFrame:
        tokens = self.vocab["tokens"]
        index = {tok: i for i, tok in enumerate(tokens) if i >= 2}  # not <pad>, <eos>

        def note(value, where: str) -> str:
            value = inputs.text(value, where)
            if value not in index:
                raise inputs.InputError(f"{where}: unknown seed note {value!r}; a note is pitch|quarter-length "
                                        f"as in the training melodies, e.g. {tokens[2]!r}")
            return value

        _, rows = inputs.generations(model_input, prime="seed", seed="random_seed", defaults=defaults.MELODY,
                                     cap=defaults.MAX_NOTES, unit="notes", check_prime=note)
        melodies = []
        for r in rows:
            generator = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
            line = self.model.generate(torch.tensor([[index[r.prime]]]), r.length, r.temperature, r.top_k,
                                       generator=generator)[0]
            melodies.append(" ".join([r.prime] + [tokens[i] for i in line]))
        return pd.DataFrame({"seed": pd.Series([r.prime for r in rows], dtype=object),
                             "melody": pd.Series(melodies, dtype=object)})

    # --- text in ----------------------------------------------------------------------------------------

    @staticmethod
    def _padded(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
        for row, seq in zip(x, ids):
            row[: len(seq)] = torch.tensor(seq)
        return x, torch.tensor([len(s) for s in ids])

    @staticmethod
    def _unknown_share(ids: list[int], unk: int) -> float:
        """Share of the row's tokens outside the vocabulary (0.0 for a text with no tokens)."""
        return sum(i == unk for i in ids) / len(ids) if ids else 0.0

    def _translation(self, model_input) -> pd.DataFrame:
        """Empty text -> ""; a text of unknown words only -> translation None (nothing to translate from)."""
        from pipeline.datasets.translation import UNK, detokenize, encode_source

        texts = inputs.texts(model_input)
        unk = self.vocab["src_tokens"].index(UNK)
        ids = [encode_source(t, self.vocab) for t in texts]
        shares = [self._unknown_share(s, unk) for s in ids]
        translations: list[str | None] = ["" if not s else None for s in ids]
        answer = [i for i, (s, share) in enumerate(zip(ids, shares)) if s and share < 1]
        if answer:
            out = self.model.greedy(*self._padded([ids[i] for i in answer]))
            words = self.vocab["tgt_tokens"]
            for i, row in zip(answer, out):
                translations[i] = detokenize([words[t] for t in row])
        return pd.DataFrame({"text": pd.Series(texts, dtype=object), "translation": pd.Series(translations,
                             dtype=object), "unknown_share": pd.Series(shares, dtype=np.float64)})

    def _text(self, model_input) -> pd.DataFrame:
        """A text with no word the model knows (an empty text too) gets label and probability None."""
        from pipeline.datasets.sentiment import UNK, token_index, tokenize

        texts = inputs.texts(model_input)
        index = token_index(self.vocab)
        unk = index[UNK]
        ids = [[index.get(tok, unk) for tok in tokenize(t)] for t in texts]
        shares = [self._unknown_share(s, unk) for s in ids]
        answer = [i for i, (s, share) in enumerate(zip(ids, shares)) if s and share < 1]
        labels: list[str | None] = [None] * len(texts)
        probabilities: list[float | None] = [None] * len(texts)
        if answer:
            found = self._classify(self.model(*self._padded([ids[i] for i in answer])))
            for i, label, p in zip(answer, found["label"], found["probability"]):
                labels[i], probabilities[i] = label, p
        return pd.DataFrame({"label": pd.Series(labels, dtype=object),
                             "probability": pd.Series(probabilities, dtype=object),
                             "unknown_share": pd.Series(shares, dtype=np.float64)})

    # --- features in ------------------------------------------------------------------------------------

    def _forward(self, x: torch.Tensor, *lengths: torch.Tensor) -> torch.Tensor:
        """The model's logits; for an empty batch (a model call on 0 rows fails) an empty (0, 1, ...) tensor."""
        return self.model(x, *lengths) if len(x) else torch.zeros(0, *([1] * (x.dim() - 1)))

    def _classify(self, logits: torch.Tensor) -> pd.DataFrame:
        probs = torch.softmax(logits, -1)
        best = probs.argmax(-1)
        labels = self.vocab["labels"]
        return pd.DataFrame({"label": pd.Series([labels[i] for i in best.tolist()], dtype=object),
                             "probability": pd.Series(probs.gather(-1, best[:, None])[:, 0].tolist(),
                                                      dtype=np.float64)})

    def _images(self, model_input) -> pd.DataFrame:
        x = inputs.images(model_input, self.info["hparams"]["dims"]["input_shape"])
        return self._classify(self._forward(torch.from_numpy(x)))

    def _normalised(self, model_input) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T_max, C) float32 normalised with the training statistics, zero-padded after normalisation as the
        prepared data were, and the lengths (N,): the model reads each row up to its own length."""
        from pipeline.datasets.common import pad

        channels = self.info["hparams"]["dims"]["input_shape"][-1]
        rows = inputs.series(model_input, channels)
        mean, std = np.asarray(self.vocab["mean"]), np.asarray(self.vocab["std"])
        x, lengths = pad([((r - mean) / std).astype(np.float32) for r in rows], dtype=np.float32)
        return torch.from_numpy(x), torch.from_numpy(lengths)

    def _series(self, model_input) -> pd.DataFrame:
        x, lengths = self._normalised(model_input)
        out = self._classify(self._forward(x, lengths))
        out["length"] = pd.Series(lengths.tolist(), dtype=np.int64)
        return out

    def _steps(self, model_input) -> pd.DataFrame:
        x, lengths = self._normalised(model_input)
        labels = np.asarray(self.vocab["labels"], dtype=object)
        best = self._forward(x, lengths).argmax(-1).numpy()
        return pd.DataFrame({"labels": pd.Series([labels[row[:n]].tolist() for row, n in zip(best, lengths.tolist())],
                                                 dtype=object),
                             "length": pd.Series(lengths.tolist(), dtype=np.int64)})

    # --- images in (pipeline/vision.py holds the contracts) ---------------------------------------------

    def _caption(self, model_input) -> pd.DataFrame:
        from pipeline.vision import caption_inputs, generate_captions

        images = caption_inputs(model_input, self.vocab["image_shape"])
        return pd.DataFrame({"caption": pd.Series(generate_captions(self.model, images) if len(images) else [],
                                                  dtype=object)})

    def _clips(self, model_input) -> pd.DataFrame:
        from pipeline.vision import clip_inputs

        clips = clip_inputs(model_input, self.vocab["frame_shape"])
        labels = np.asarray(self.vocab["labels"], dtype=object)
        actions = [labels[self.model(torch.from_numpy(c)[None]).argmax(-1)[0].numpy()].tolist() for c in clips]
        return pd.DataFrame({"actions": pd.Series(actions, dtype=object),
                             "length": pd.Series([len(c) for c in clips], dtype=np.int64)})


set_model(RNNPyfunc())
