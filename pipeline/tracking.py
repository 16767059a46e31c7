"""MLflow, in one place: where the store is, the Lightning logger, artifacts, models and the registry.

The tracking URI comes from params (`tracking.uri`, default sqlite:///mlflow.db: the registry
needs a database) unless MLFLOW_TRACKING_URI is set. Relative sqlite paths and the artifact
location are anchored at the repo root (where params.yaml lives), not at whatever directory a
process started in, so `mlflow ui --backend-store-uri sqlite:///mlflow.db` from the repo root
shows everything. Only global rank 0 ever talks to MLflow.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import Params, PipelineError, first_line


def is_global_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def tracking_uri(params: Params, root: Path = Path(".")) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str((root / uri[len(prefix):]).resolve())
    elif "://" not in uri:  # a plain folder: a file store
        uri = str((root / uri).resolve())
    return uri


def artifact_location(params: Params, root: Path = Path(".")) -> str:
    location = params.tracking.artifact_location
    return location if "://" in location else str((root / location).resolve())


@contextmanager
def _fail_fast():
    """MLflow retries HTTP calls for minutes by default: a dead server should fail in seconds."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def mlflow_uri(uri: str):
    """mlflow.set_tracking_uri(uri) for a block. MLflow (and Lightning's logger through it) also exports the
    URI to os.environ["MLFLOW_TRACKING_URI"], where tracking_uri() would take it for the user's override and
    send every later call in this process to this store, whatever its params say: put the variable back."""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        mlflow.set_tracking_uri(uri)
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def experiment_id(params: Params, root: Path = Path(".")) -> str:
    """The project's experiment (created on first use); a clear error if the store is unusable."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params, root)
    try:
        with _fail_fast():
            client = MlflowClient(uri)
            found = client.get_experiment_by_name(params.tracking.experiment)
            if found is not None:
                return found.experiment_id
            return client.create_experiment(params.tracking.experiment, artifact_location(params, root))
    except Exception as err:  # MLflow raises many kinds; the user needs the first line
        raise PipelineError(f"MLflow tracking store {uri} is unreachable or unwritable: {first_line(err)}") from None


def git_commit(root: Path = Path(".")) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def flush() -> None:
    """Wait for metrics logged in the background (MLFlowLogger(synchronous=False)) to land."""
    import mlflow

    mlflow.flush_async_logging()


def make_logger(params: Params, task: str, tags: dict, run_id: str | None = None, root: Path = Path(".")):
    """Lightning's MLFlowLogger for one training run of `task` (resumed when run_id is given)."""
    from lightning.pytorch.loggers import MLFlowLogger

    experiment_id(params, root)  # fail before training, in one line, if the store is unusable
    uri = tracking_uri(params, root)
    logger = MLFlowLogger(experiment_name=params.tracking.experiment, run_name=task, tracking_uri=uri, tags=tags,
                          run_id=run_id, artifact_location=artifact_location(params, root), log_model=False,
                          synchronous=False)  # sqlite commits cost ~0.2 s each: log per step in the background
    with mlflow_uri(uri):
        logger.experiment  # noqa: B018  start the run now: its first use calls mlflow.set_tracking_uri
    return logger


def log_evaluation(params: Params, run_id: str, metrics: dict, paths: list[Path], root: Path = Path(".")) -> None:
    """Evaluation results into the training run: test metrics and every file it wrote."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(params, root))
    values = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
    for path in paths:
        if Path(path).is_dir():
            # plots/<task> -> evaluation/plots, samples/<task> -> evaluation/samples
            client.log_artifacts(run_id, str(path), artifact_path=f"evaluation/{Path(path).parent.name}")
        elif Path(path).exists():
            client.log_artifact(run_id, str(path), artifact_path="evaluation")


# What loading and predicting import (the pipeline package itself travels as code): no data-source packages,
# no DVC. Lightning stays: every model class is a LightningModule. Pinned at logging time by pip_requirements().
PIP_REQUIREMENTS = ["torch", "lightning", "mlflow", "numpy", "pandas", "safetensors", "pydantic", "pyyaml"]


def pip_requirements() -> list[str]:
    """PIP_REQUIREMENTS pinned to the installed versions (explicit: environment capture took 8.7 s here, this
    ~1 s). A local version label is dropped as MLflow does (torch 2.13.0+cpu -> torch==2.13.0), so pip can
    install it from the default index; which build (CPU, CUDA) it takes is the serving machine's choice."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in PIP_REQUIREMENTS]


def _signature_and_example(model_dir: Path):
    """(input schema, input example) of a trained model: what its pyfunc predict takes.

    The input schema is None for every model: pipeline/serving_inputs.py checks every input itself (one-line
    errors naming row and column) and MLflow's schema types each refuse inputs the contract takes. Measured with
    MLflow 3.17: a `long` column refuses a batch where only some rows set it (float64 with NaN), `double` refuses
    a pandas int64 column (`"length": [300]`), `any` breaks CSV (no pandas dtype: a 400 with a stack trace)
    and turns `{"inputs": {"text": [...]}}` into one row, a `string` column answers a JSON number with MLflow's
    several-line message, and a tensor spec refuses float64 arrays and series of different lengths. Without a
    schema MLflow hands predict what the payload parses to, in every format. The examples are real inputs in
    the units predict takes (feature models: pipeline.datasets.<task>.example())."""
    import json

    import pandas as pd

    from pipeline.serving_defaults import MELODY
    from pipeline.serving_inputs import kind_of
    from pipeline.tasks import get_task

    info = json.loads((model_dir / "config.json").read_text())
    kind, vocab = kind_of(info), info["hparams"]["vocab"]
    if kind == "charlm":
        primes = [p for p in ("ROMEO:", "The ") if set(p) <= set(vocab["chars"])] or [vocab["chars"][-1]]
        return None, pd.DataFrame({"prime": (primes * 2)[:2], "length": [40, None],  # a partly filled batch
                                   "temperature": [0.8, 0.0]})
    if kind == "melody":
        return None, pd.DataFrame({"seed": [vocab["tokens"][2]], "length": [16], "temperature": [MELODY.temperature],
                                   "top_k": [MELODY.top_k], "random_seed": [0]})
    if kind == "translation":
        return None, pd.DataFrame({"text": ["three hundred and forty-two", "seven"]})
    if kind == "text":
        return None, pd.DataFrame({"text": ["a gripping, beautifully acted film", "dull and lifeless"]})
    return None, get_task(info["task"]).data_module.example()


def log_and_register(params: Params, name: str, model_dir: Path, run_id: str, root: Path = Path(".")) -> str:
    """Log models/<name>/ into its run as a pyfunc (models from code) and register it; the version."""
    import tempfile

    import mlflow
    from mlflow.models import infer_signature

    inputs, example = _signature_and_example(model_dir)
    package = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp, mlflow_uri(tracking_uri(params, root)):
        weights = Path(tmp) / "model"
        weights.mkdir()
        for f in ("weights.safetensors", "config.json"):  # no checkpoints: weights and config only
            (weights / f).write_bytes((model_dir / f).read_bytes())
        # the output schema: what predict gives for the example
        from pipeline.pyfunc_model import RNNPyfunc

        loaded = RNNPyfunc()
        loaded.load_context(type("Ctx", (), {"artifacts": {"model": str(weights)}})())
        output = loaded.predict(None, example)
        signature = infer_signature(example, output)
        signature.inputs = inputs
        with mlflow.start_run(run_id=run_id):
            logged = mlflow.pyfunc.log_model(
                name="model", python_model=str(package / "pyfunc_model.py"), artifacts={"model": str(weights)},
                code_paths=[str(package)], pip_requirements=pip_requirements(), signature=signature,
                input_example=example)
        version = mlflow.register_model(logged.model_uri, name, tags={"run_id": run_id})
    return str(version.version)


def find_version(client, name: str, run_id: str) -> str | None:
    """The version already registered from this run, if any (registering twice makes no second one)."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:
        return None
    for v in versions:
        if v.run_id == run_id and v.tags.get("key_metric"):
            return str(v.version)
    return None


def alias_version(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # no such alias (or model) yet
        return None
