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

from pipeline.config import Params, PipelineError, first_line


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


def sample(params: Params, uri: str, prime: str | None, length: int, temperature: float, top_k: int | None,
           seed: int | None = None) -> str:
    """`sample`: text from a registered model whose topology has the `sample` verb (a char LM)."""
    from pipeline.models.serving import sampling_options
    from pipeline.serving_defaults import MAX_CHARS

    options = sampling_options({"length": length, "temperature": temperature, "top_k": top_k, "seed": seed},
                               MAX_CHARS)  # before loading anything: a bad option is one quick line
    model = load(params, uri)
    task = _task_of(model, uri)
    pyfunc = model.unwrap_python_model()
    if "sample" not in pyfunc.topology.verbs:
        raise PipelineError(f"{uri} is the {task!r} model, not a char LM: `sample` needs one (its topology "
                            f"{pyfunc.topology.name} has no `sample`; try `python -m pipeline predict {task} ...`)")
    return _run(model, pyfunc.topology.cli_sample(pyfunc, prime, options))["text"][0]


def predict(params: Params, task: str, inputs: list[str], uri: str | None, **options) -> str:
    """`predict`: the task's registered model on command-line inputs; the topology reads them
    (texts, primes, seed notes, .npy or .csv files) and says which sampling options it takes."""
    from pipeline.tasks import get_task

    get_task(task, params)
    uri = uri or f"models:/{task}@champion"
    model = load(params, uri)
    found = _task_of(model, uri)
    if found != task:
        raise PipelineError(f"{uri} is the {found!r} model, not {task!r}")
    pyfunc = model.unwrap_python_model()
    return _run(model, pyfunc.topology.cli_input(pyfunc, inputs, options)).to_string(index=False)
