"""The input contract of every served model: what the pyfunc model's `predict` accepts, checks and returns.

One contract per kind of model: the topology object's `predict` (pipeline/models/<topology>.py) picks it from
its vocabulary (the README's "Serving" section is the user's copy):

    text          sentiment     column `text`: a string, "" allowed
    translation   translation   column `text`: a string, "" allowed
    charlm        charlm        column `prime`: a non-empty string of known characters
                                [, `length`, `temperature`, `top_k`, `seed`]
    melody        melody        column `seed`: a known note such as "C5|1.0"
                                [, `length`, `temperature`, `top_k`, `random_seed`]
    images        digits        an array (N, 28, 28) or (N, 784), or a list of 28x28 images; pixels in [0, 1]
    features      tabular       a table of the model's feature columns (raw units), or an array (N, F)
    series        gesture       an array (N, T, C) (or (N, T) for one channel) padded at the end with NaN steps,
    steps         activity      a list of (T_i, C) arrays, or a DataFrame whose column `series` holds one per row

Tables come as a DataFrame, a dict of columns, a list of records or a list of strings. Every problem is an
`InputError` raised before any model work: one line that names the row (0-based, in input order) and the
column, which MLflow's scoring server answers with HTTP 400. Optional columns take their default where a cell
is missing (None/NaN), so a batch where only some rows set `length` is fine. Whole numbers may arrive as floats
(3.0: a JSON batch with a missing cell) or numeric strings (CSV), never as fractions or booleans. Unknown
columns are refused by name. An empty input gives an empty DataFrame with the output columns.

Series: only NaN marks padding. A series ends before its trailing run of all-NaN steps; zeros are data, so a
zero-padded series is read as a series that ends in zeros (the output's `length` shows it). A NaN inside a
series, or in some channels of a step, is an error. Each series is then predicted at its own length, exactly
as if it were sent alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from pipeline.serving_defaults import MAX_SEED, Generation


class OneLineError(MlflowException):
    """An MlflowException whose message stays the one line it was raised with.

    MLflow's scoring server rewrites the message of any MlflowException raised in predict to
    "Failed to predict data '<repr of the whole input>'. \\nError: <message>", several lines for any DataFrame;
    here the first assignment to `message` wins."""

    error_code_value = INTERNAL_ERROR

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()), error_code=self.error_code_value)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if "_message" not in self.__dict__:
            self._message = value


class InputError(OneLineError):
    """A problem with the input that the caller can fix: HTTP 400 (INVALID_PARAMETER_VALUE)."""

    error_code_value = INVALID_PARAMETER_VALUE


class PredictError(OneLineError):
    """A failure inside the model on an input that passed its contract: HTTP 500, the traceback in the
    server's log rather than in the response."""


def at(row: int, column: str | None = None) -> str:
    return f"row {row}" + (f", column {column!r}" if column else "")


def is_missing(value) -> bool:
    """None, NaN or pandas' NA: an unset cell."""
    if value is None or value is pd.NA:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value, where: str, what: str) -> float | int:
    """A real number from a number or a numeric string (CSV); InputError for booleans and anything else."""
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{where}: expected {what}, got a boolean {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InputError(f"{where}: expected {what}, got the string {_show(value)}") from None
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return float(value)
    raise InputError(f"{where}: expected {what}, got {type(value).__name__} {_show(value)}")


def whole(value, where: str, low: int, high: int | None, default):
    """An optional whole number in [low, high] (high None: no upper bound); `default` where missing."""
    if is_missing(value):
        return default
    span = f">= {low}" if high is None else f"between {low} and {high}"
    number = _number(value, where, f"a whole number {span}")
    if isinstance(number, float):
        if not math.isfinite(number) or not number.is_integer():
            raise InputError(f"{where}: expected a whole number {span}, got {_show(value)}")
        number = int(number)
    if number < low or (high is not None and number > high):
        raise InputError(f"{where}: {number} is out of range; expected a whole number {span}")
    return number


def real(value, where: str, low: float, default):
    """An optional finite number >= low; `default` where missing."""
    if is_missing(value):
        return default
    number = float(_number(value, where, f"a finite number >= {low}"))
    if not math.isfinite(number) or number < low:
        raise InputError(f"{where}: expected a finite number >= {low}, got {_show(value)}")
    return number


def text(value, where: str) -> str:
    """A required string ("" allowed)."""
    if is_missing(value):
        raise InputError(f'{where}: missing (None/NaN); send a string ("" for an empty text)')
    if not isinstance(value, str):
        raise InputError(f"{where}: expected a string, got {type(value).__name__} {_show(value)}")
    return value


# --- tables: text and generation --------------------------------------------------------------------------


def _as_column(value) -> list | tuple | np.ndarray | pd.Series:
    """A dict value as a column: sequences as they are, a scalar (or a 0-d array: MLflow parses the JSON
    {"inputs": {"text": 42}} so) as one row."""
    if isinstance(value, (list, tuple, pd.Series)) or (isinstance(value, np.ndarray) and value.ndim):
        return value
    return [value.item() if isinstance(value, np.ndarray) else value]


def table(model_input, required: str, optional: Sequence[str] = ()) -> pd.DataFrame:
    """The input as a DataFrame with the `required` column and only known columns.

    Takes a DataFrame, a dict of columns, a list of records (dicts), or a string / list of strings (the
    required column)."""
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, pd.Series):
        frame = model_input.to_frame(model_input.name if model_input.name in (required, *optional) else required)
    elif isinstance(model_input, str):
        frame = pd.DataFrame({required: [model_input]})
    elif isinstance(model_input, dict):
        columns = {k: _as_column(v) for k, v in model_input.items()}
        try:
            frame = pd.DataFrame(columns)
        except ValueError as err:
            raise InputError(f"the columns must all have the same number of rows ({err})") from None
    elif isinstance(model_input, (list, tuple, np.ndarray)):
        rows = list(model_input)
        if rows and all(isinstance(r, dict) for r in rows):
            frame = pd.DataFrame(rows)
        elif all(not isinstance(r, (dict, list, tuple, np.ndarray)) for r in rows):
            frame = pd.DataFrame({required: rows})
        else:
            raise InputError(f"expected a DataFrame with a column {required!r}, a list of records or a list of "
                             f"strings; got a list of {type(rows[0]).__name__}")
    else:
        raise InputError(f"expected a DataFrame with a column {required!r}; got {type(model_input).__name__}")
    unknown = [str(c) for c in frame.columns if c not in (required, *optional)]
    if unknown:
        raise InputError(f"unknown column(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(map(repr, (required, *optional)))}")
    if required not in frame.columns:
        if len(frame) == 0:
            return pd.DataFrame({required: pd.Series([], dtype=object)})
        raise InputError(f"missing column {required!r}")
    for column in frame.columns:  # MLflow parses JSON "instances" records into cells of 0-d arrays: unwrap them
        cells = frame[column].tolist()
        if any(isinstance(v, np.ndarray) and v.ndim == 0 for v in cells):
            frame = frame.assign(**{column: [v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v
                                             for v in cells]})
    return frame.reset_index(drop=True)


def texts(model_input) -> list[str]:
    """The `text` column: one string per row ("" allowed)."""
    frame = table(model_input, "text")
    return [text(v, at(i, "text")) for i, v in enumerate(frame["text"].tolist())]


def generations(model_input, *, prime: str, seed: str, defaults: Generation, cap: int, unit: str,
                check_prime) -> tuple[pd.DataFrame, list[Generation]]:
    """Rows of a generator's input (prime column `prime`, random seed column `seed`), checked and filled in.

    `check_prime(value, where)` returns the prime or raises InputError. Each row's length and the total of
    all rows' lengths are at most `cap` (`unit`: characters, notes)."""
    frame = table(model_input, prime, ("length", "temperature", "top_k", seed))
    rows = []
    for i, record in enumerate(frame.to_dict("records")):
        rows.append(Generation(
            check_prime(record[prime], at(i, prime)),
            whole(record.get("length"), at(i, "length"), 0, cap, defaults.length),
            real(record.get("temperature"), at(i, "temperature"), 0.0, defaults.temperature),
            whole(record.get("top_k"), at(i, "top_k"), 1, None, defaults.top_k),
            whole(record.get(seed), at(i, seed), 0, MAX_SEED, defaults.seed)))
    total = sum(r.length for r in rows)
    if total > cap:
        raise InputError(f"the rows ask for {total} {unit} in all; one request generates at most {cap} "
                         "(send fewer rows or shorter lengths per request)")
    return frame, rows


# --- arrays: images and series ----------------------------------------------------------------------------


def _float_array(value, where: str) -> np.ndarray:
    """float64 array of nested lists / arrays (None -> NaN); InputError for ragged or non-numeric data."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        if value.dtype.kind == "b":
            raise InputError(f"{where}: expected numbers, got booleans")
        return value.astype(np.float64, copy=False)
    if isinstance(value, np.ndarray):
        value = value.tolist()  # object arrays (JSON nulls): None becomes NaN below
    try:
        return np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as err:
        reason = "rows of different lengths" if "inhomogeneous" in str(err) else "values that are not numbers"
        raise InputError(f"{where}: expected numbers, found {reason}") from None


def images(model_input, shape: Sequence[int]) -> np.ndarray:
    """(N, *shape) float32 images with pixels in [0, 1] from an array (N, *shape) or (N, prod(shape)), one
    image of `shape`, a list of images, or a DataFrame of prod(shape) pixel columns (CSV)."""
    shape, size = tuple(shape), math.prod(shape)
    form = f"an array (N, {', '.join(map(str, shape))}) or (N, {size})"
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.to_numpy()
    x = _float_array(model_input, "the input")
    if x.shape == shape:
        x = x[None]
    elif x.ndim == 2 and x.shape[1] == size:
        x = x.reshape(-1, *shape)
    elif x.shape[1:] != shape:
        if x.size == 0:
            return np.zeros((0, *shape), np.float32)
        raise InputError(f"expected images of shape {shape}: {form}; got an array of shape {x.shape}")
    for i, image in enumerate(x):
        if not np.isfinite(image).all():
            raise InputError(f"{at(i)}: the image holds NaN or infinite pixels")
        if image.min() < 0 or image.max() > 1:
            raise InputError(f"{at(i)}: pixel values must lie in [0, 1], got {image.min():g}..{image.max():g} "
                             "(divide 0-255 images by 255)")
    return x.astype(np.float32)


def features(model_input, names: Sequence[str]) -> np.ndarray:
    """(N, F) float64 feature rows in raw units: a DataFrame (or dict of columns, list of records) with exactly
    the F columns `names` (CSV), an array (N, F), one row (F,), or a list of rows; every value finite."""
    if isinstance(model_input, (dict, pd.DataFrame)) or (isinstance(model_input, list) and model_input
                                                         and isinstance(model_input[0], dict)):
        frame = pd.DataFrame(model_input) if not isinstance(model_input, pd.DataFrame) else model_input
        missing = [n for n in names if n not in frame.columns]
        unknown = [str(c) for c in frame.columns if c not in names]
        if missing:
            raise InputError(f"missing column(s) {', '.join(map(repr, missing))}; the model takes "
                             f"{', '.join(map(repr, names))}")
        if unknown:
            raise InputError(f"unknown column(s) {', '.join(map(repr, unknown))}; known: {', '.join(map(repr, names))}")
        for column in names:
            for i, value in enumerate(frame[column].tolist()):
                _number(value, at(i, column), "a number")
        model_input = frame[list(names)].apply(pd.to_numeric, errors="coerce").to_numpy()
    x = _float_array(model_input, "the input")
    if x.ndim == 1 and len(x) == len(names):
        x = x[None]
    if x.size == 0:
        return np.zeros((0, len(names)))
    if x.ndim != 2 or x.shape[1] != len(names):
        raise InputError(f"expected rows of {len(names)} features ({', '.join(names)}); got an array of shape "
                         f"{x.shape}")
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        raise InputError(f"{at(int(bad[0][0]), names[int(bad[0][1])])}: missing or not a finite number")
    return x


def _rows(model_input, channels: int) -> list:
    """The per-row series of any accepted series input, not yet checked."""
    if isinstance(model_input, pd.DataFrame):
        if "series" in model_input.columns:
            if len(model_input.columns) > 1:
                others = [str(c) for c in model_input.columns if c != "series"]
                raise InputError(f"unknown column(s) {', '.join(map(repr, others))}; known: 'series'")
            return model_input["series"].tolist()
        if channels != 1:
            raise InputError(f"a DataFrame needs a column 'series' holding one (T, {channels}) list per row")
        return list(model_input.to_numpy())  # one single-channel series per row (the UCR table layout)
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    if isinstance(model_input, np.ndarray):
        x = _float_array(model_input, "the input") if model_input.dtype == object else model_input
        if x.ndim == 2 and channels == 1:
            x = x[..., None]
        if x.ndim != 3 and x.size:
            raise InputError(f"expected series as an array (N, T, {channels})"
                             f"{' or (N, T)' if channels == 1 else ''}; got an array of shape {x.shape}")
        return list(x)
    raise InputError(f"expected series: an array (N, T, {channels}), a list of (T, {channels}) arrays or a "
                     f"DataFrame with a column 'series'; got {type(model_input).__name__}")


def series(model_input, channels: int) -> list[np.ndarray]:
    """One float64 (T_i, channels) array per row, trailing all-NaN steps (the padding) removed."""
    out = []
    for i, row in enumerate(_rows(model_input, channels)):
        x = _float_array(row, at(i))
        if x.ndim == 1 and channels == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != channels:
            raise InputError(f"{at(i)}: expected a series of shape (T, {channels}); got shape {x.shape}")
        nan = np.isnan(x)
        real_steps = np.flatnonzero(~nan.all(axis=1))
        length = int(real_steps[-1]) + 1 if len(real_steps) else 0
        if length == 0:
            raise InputError(f"{at(i)}: the series has no steps (empty or all NaN)")
        x = x[:length]
        if nan[:length].any():
            step, channel = np.argwhere(nan[:length])[0]
            raise InputError(f"{at(i)}: NaN at step {step}, channel {channel}, inside the series; only whole "
                             "NaN steps at the end mark padding")
        if not np.isfinite(x).all():
            step = int(np.argwhere(~np.isfinite(x))[0][0])
            raise InputError(f"{at(i)}: infinite value at step {step}")
        out.append(x)
    return out
