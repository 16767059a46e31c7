"""What the topologies' pyfunc predict share: padding token ids, class probabilities, normalised series.

Each takes the loaded pyfunc model (`pyfunc.model`, `pyfunc.info` (config.json), `pyfunc.vocab`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline import serving_inputs as inputs
from pipeline.batch import PAD


def padded(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) int64 token ids padded with PAD, and the lengths (B,)."""
    x = torch.full((len(ids), max(map(len, ids))), PAD, dtype=torch.long)
    for row, seq in zip(x, ids):
        row[: len(seq)] = torch.tensor(seq)
    return x, torch.tensor([len(s) for s in ids])


def unknown_share(ids: list[int], unk: int) -> float:
    """Share of the row's tokens outside the vocabulary (0.0 for a text with no tokens)."""
    return sum(i == unk for i in ids) / len(ids) if ids else 0.0


def forward(pyfunc, x: torch.Tensor, *lengths: torch.Tensor) -> torch.Tensor:
    """The model's logits; for an empty batch (a model call on 0 rows fails) an empty (0, 1, ...) tensor."""
    return pyfunc.model(x, *lengths) if len(x) else torch.zeros(0, *([1] * (x.dim() - 1)))


def classify(pyfunc, logits: torch.Tensor) -> pd.DataFrame:
    """label and probability of the likeliest class per row."""
    probs = torch.softmax(logits, -1)
    best = probs.argmax(-1)
    labels = pyfunc.vocab["labels"]
    return pd.DataFrame({"label": pd.Series([labels[i] for i in best.tolist()], dtype=object),
                         "probability": pd.Series(probs.gather(-1, best[:, None])[:, 0].tolist(),
                                                  dtype=np.float64)})


def normalised_series(pyfunc, model_input) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T_max, C) float32 normalised with the training statistics, zero-padded after normalisation as the
    prepared data were, and the lengths (N,): the model reads each row up to its own length."""
    from pipeline.datasets.common import pad

    channels = pyfunc.info["hparams"]["dims"]["input_shape"][-1]
    rows = inputs.series(model_input, channels)
    mean, std = np.asarray(pyfunc.vocab["mean"]), np.asarray(pyfunc.vocab["std"])
    x, lengths = pad([((r - mean) / std).astype(np.float32) for r in rows], dtype=np.float32)
    return torch.from_numpy(x), torch.from_numpy(lengths)


def npy_files(names: list[str], task: str) -> list[tuple[str, np.ndarray]]:
    """(name, array) of each .npy file named on the command line; PipelineError for anything else."""
    return [(name, load_npy(name, f"{task} takes .npy files (one input or several stacked); got {name!r}"))
            for name in names]


def load_npy(name: str, wrong_suffix: str) -> np.ndarray:
    """The array in the .npy file `name` (no pickles); PipelineError `wrong_suffix` for a file of another suffix,
    a one-line PipelineError for a missing or unreadable one."""
    from pathlib import Path

    from pipeline.config import PipelineError, first_line

    path = Path(name)
    if path.suffix != ".npy":
        raise PipelineError(wrong_suffix)
    if not path.is_file():
        raise PipelineError(f"{name}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001  (any unreadable file is the user's to fix)
        raise PipelineError(f"{name}: not a readable .npy array ({first_line(err)})") from None


def series_rows(pyfunc, task: str, names: list[str]) -> list:
    """One row per series on the command line: a file holds one series (T, C), or (T,) with one channel, or a
    stack of them ((N, T, C), or (N, T) NaN-padded with one channel). Series of different lengths come as
    separate rows, each read at its own length."""
    from pipeline.config import PipelineError

    channels = pyfunc.info["hparams"]["dims"]["input_shape"][-1]
    rows = []
    for name, x in npy_files(names, task):
        if (x.ndim == 1 and channels == 1) or (x.ndim == 2 and x.shape[1] == channels):
            rows.append(x)
        elif (x.ndim == 3 and x.shape[2] == channels) or (x.ndim == 2 and channels == 1):
            rows.extend(x)
        else:
            raise PipelineError(f"{name}: an array of shape {x.shape} is not one series (T, {channels}) or a "
                                f"stack (N, T, {channels}) padded with NaN")
    return rows


def no_options(task: str, options: dict) -> None:
    """`predict`'s sampling options are for generators only."""
    from pipeline.config import PipelineError

    given = [SAMPLING_OPTIONS[k] for k, v in options.items() if v is not None]
    if given:
        raise PipelineError(f"{', '.join(given)}: only for generators (charlm, melody), not {task}")


SAMPLING_OPTIONS = {"length": "--length", "temperature": "--temperature", "top_k": "--top-k", "seed": "--seed"}


def sampling_options(options: dict, cap: int) -> dict:
    """The set sampling options, checked with the serving contract; the option names in the messages."""
    from pipeline.config import PipelineError
    from pipeline.serving_defaults import MAX_SEED

    checks = {"length": lambda v, w: inputs.whole(v, w, 0, cap, None),
              "temperature": lambda v, w: inputs.real(v, w, 0.0, None),
              "top_k": lambda v, w: inputs.whole(v, w, 1, None, None),
              "seed": lambda v, w: inputs.whole(v, w, 0, MAX_SEED, None)}
    checked = {}
    for name, value in options.items():
        if value is None:
            continue
        if inputs.is_missing(value):  # NaN: a missing cell in a table, but on a command line a bad number
            raise PipelineError(f"{SAMPLING_OPTIONS[name]}: expected a finite number, got {value}")
        try:
            checked[name] = checks[name](value, SAMPLING_OPTIONS[name])
        except inputs.InputError as err:
            raise PipelineError(err.message) from None
    return checked
