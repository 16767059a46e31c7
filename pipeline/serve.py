"""Use registered models from the command line: `sample` (char LM text) and `predict` (any task).

    python -m pipeline sample --prime "ROMEO:" --length 300 --temperature 0.8 --seed 1
    python -m pipeline predict sentiment "a triumph of a film" "dull and lifeless"
    python -m pipeline predict translation "forty-two" --model-uri models:/translation/1
    python -m pipeline predict melody "C5|1.0" --temperature 0.8 --length 40 --seed 3
    python -m pipeline predict gesture a.npy b.npy        # series of different lengths: one row each
    python -m pipeline predict digits seven.npy some.npy  # a file holds one image (28, 28) or several (N, 28, 28)

Models load by name and alias (default `models:/<task>@champion`) through mlflow.pyfunc and take the same
input contract as under `mlflow models serve` (pipeline/serving_inputs.py). Every user error is a
PipelineError: one line, exit code 2.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params, PipelineError, first_line

# `predict`'s sampling options: (option, column in the model's input)
SAMPLING = {"length": "--length", "temperature": "--temperature", "top_k": "--top-k", "seed": "--seed"}


def load(params: Params, uri: str):
    import mlflow

    from pipeline import tracking

    tracking.experiment_id(params)  # one clear line if the store is unusable
    try:
        with tracking.mlflow_uri(tracking.tracking_uri(params)):
            return mlflow.pyfunc.load_model(uri)
    except Exception as err:
        raise PipelineError(f"cannot load {uri}: {first_line(err)} (run `dvc repro register` first?)") from None


def _task_of(model, uri: str) -> str:
    """The task key a loaded model was trained for (its config.json); PipelineError if not one of ours."""
    try:
        return model.unwrap_python_model().info["task"]
    except Exception:
        raise PipelineError(f"{uri} is not a model of this pipeline (no RNNPyfunc with a task)") from None


def _run(model, model_input):
    """model.predict with the input contract's errors as one-line PipelineErrors."""
    from mlflow.exceptions import MlflowException

    try:
        return model.predict(model_input)
    except MlflowException as err:
        raise PipelineError(first_line(err.message)) from None
    except ValueError as err:
        raise PipelineError(first_line(err)) from None


def _options(kind: str, options: dict) -> dict:
    """The set sampling options, checked with the serving contract; the option names in the messages."""
    from pipeline import serving_inputs as inputs
    from pipeline.serving_defaults import MAX_CHARS, MAX_NOTES, MAX_SEED

    cap = MAX_CHARS if kind == "charlm" else MAX_NOTES
    checks = {"length": lambda v, w: inputs.whole(v, w, 0, cap, None),
              "temperature": lambda v, w: inputs.real(v, w, 0.0, None),
              "top_k": lambda v, w: inputs.whole(v, w, 1, None, None),
              "seed": lambda v, w: inputs.whole(v, w, 0, MAX_SEED, None)}
    checked = {}
    for name, value in options.items():
        if value is None:
            continue
        if inputs.is_missing(value):  # NaN: a missing cell in a table, but on a command line a bad number
            raise PipelineError(f"{SAMPLING[name]}: expected a finite number, got {value}")
        try:
            checked[name] = checks[name](value, SAMPLING[name])
        except inputs.InputError as err:
            raise PipelineError(err.message) from None
    return checked


def sample(params: Params, uri: str, prime: str, length: int, temperature: float, top_k: int | None,
           seed: int | None = None) -> str:
    import pandas as pd

    checked = _options("charlm", {"length": length, "temperature": temperature, "top_k": top_k, "seed": seed})
    model = load(params, uri)
    task = _task_of(model, uri)
    if model.unwrap_python_model().kind != "charlm":
        raise PipelineError(f"{uri} is the {task!r} model, not a char LM: `sample` needs one "
                            f"(try `python -m pipeline predict {task} ...`)")
    return _run(model, pd.DataFrame({"prime": [prime], **{k: [v] for k, v in checked.items()}}))["text"][0]


def _file_bytes(name: str) -> bytes:
    path = Path(name)
    if not path.is_file():
        raise PipelineError(f"{name}: no such file")
    return path.read_bytes()


def _arrays(inputs: list[str], task: str) -> list[tuple[str, object]]:
    """(name, array) of each .npy file named on the command line; PipelineError for anything else."""
    import numpy as np

    rows = []
    for name in inputs:
        path = Path(name)
        if path.suffix != ".npy":
            raise PipelineError(f"{task} takes .npy files (one input or several stacked); got {name!r}")
        if not path.is_file():
            raise PipelineError(f"{name}: no such file")
        try:
            x = np.load(path, allow_pickle=False)
        except Exception as err:
            raise PipelineError(f"{name}: not a readable .npy array ({first_line(err)})") from None
        rows.append((name, x))
    return rows


def _feature_rows(model, task: str, files: list[tuple[str, object]]) -> list:
    """One row per input: a file holds one input (an image (28, 28) or (784,); a series (T, C), or (T,) with one
    channel) or a stack of them along a first axis ((N, 28, 28); (N, T, C), or (N, T) NaN-padded with one
    channel). Series of different lengths come as separate rows, each read at its own length."""
    import math

    info = model.unwrap_python_model().info
    shape = tuple(info["hparams"]["dims"]["input_shape"])
    rows = []
    for name, x in files:
        if info["topology"] == "one_to_one":
            one = (shape, (math.prod(shape),))
            if x.shape in one:
                rows.append(x.reshape(shape))
                continue
            if x.ndim >= 2 and x.shape[1:] in one:
                rows.extend(x.reshape(-1, *shape))
                continue
            form = f"one image {shape} or a stack (N, {', '.join(map(str, shape))})"
        else:
            channels = shape[-1]
            if (x.ndim == 1 and channels == 1) or (x.ndim == 2 and x.shape[1] == channels):
                rows.append(x)
                continue
            if (x.ndim == 3 and x.shape[2] == channels) or (x.ndim == 2 and channels == 1):
                rows.extend(x)
                continue
            form = f"one series (T, {channels}) or a stack (N, T, {channels}) padded with NaN"
        raise PipelineError(f"{name}: an array of shape {x.shape} is not {form}")
    return rows


def predict(params: Params, task: str, inputs: list[str], uri: str | None, **options) -> str:
    import pandas as pd

    from pipeline.tasks import get_task

    get_task(task)
    uri = uri or f"models:/{task}@champion"
    model = load(params, uri)
    found = _task_of(model, uri)
    if found != task:
        raise PipelineError(f"{uri} is the {found!r} model, not {task!r}")
    kind = model.unwrap_python_model().kind
    set_options = [SAMPLING[k] for k, v in options.items() if v is not None]
    if kind in ("charlm", "melody"):
        checked = _options(kind, options)
        column = {"charlm": "prime", "melody": "seed"}[kind]
        if kind == "melody" and "seed" in checked:
            checked["random_seed"] = checked.pop("seed")
        frame = pd.DataFrame({column: inputs, **{k: [v] * len(inputs) for k, v in checked.items()}})
        out = _run(model, frame)
    elif set_options:
        raise PipelineError(f"{', '.join(set_options)}: only for generators (charlm, melody), not {task}")
    elif kind in ("text", "translation"):
        out = _run(model, pd.DataFrame({"text": inputs}))
    elif kind == "caption":  # image files: their bytes, so the model reads what the user named
        out = _run(model, pd.DataFrame({"image": [_file_bytes(name) for name in inputs]}))
        out.insert(0, "image", inputs)
    elif kind == "clips":
        clips = []
        for _, x in _arrays(inputs, task):  # a file holds one clip (T, H, W) or a stack (N, T, H, W)
            clips.extend(x if x.ndim == 4 else [x])
        out = _run(model, clips)
    else:
        out = _run(model, _feature_rows(model, task, _arrays(inputs, task)))
    return out.to_string(index=False)
