"""MLflow, in one place: where the store is, the Lightning logger, artifacts, models and the registry.

The tracking URI comes from params (`tracking.uri`, default sqlite:///mlflow.db: the registry
needs a database) unless MLFLOW_TRACKING_URI is set. Relative sqlite paths and the artifact
location are anchored at the repo root (where params.yaml lives), not at whatever directory a
process started in, so `mlflow ui --backend-store-uri sqlite:///mlflow.db` from the repo root
shows everything. Only global rank 0 ever talks to MLflow.

A training run is what the MLflow UI shows as one row: named after its task and DVC experiment,
tagged with the commit, the DVC stage and experiment, and whether params differ from the commit;
only the params its task reads; the prepared data as its input dataset (DVC hash as digest);
ended when training ends, so its duration is the training's. Evaluation (`<split>_<metric>`)
and registration log into it afterwards without reopening it.
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


# The MLflow 3 UI opens an experiment without this tag on its GenAI overview (traces, judges);
# a model-training one opens on its runs. Set when missing: a kind chosen in the UI stays.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(params: Params, root: Path = Path(".")) -> str:
    """The project's experiment (created on first use, marked as model training); a clear error if the
    store is unusable."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params, root)
    try:
        with _fail_fast():
            client = MlflowClient(uri)
            found = client.get_experiment_by_name(params.tracking.experiment)
            if found is not None:
                if EXPERIMENT_KIND_TAG not in found.tags:  # made before the tag existed
                    client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                return found.experiment_id
            return client.create_experiment(params.tracking.experiment, artifact_location(params, root),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception as err:  # MLflow raises many kinds; the user needs the first line
        raise PipelineError(f"MLflow tracking store {uri} is unreachable or unwritable: {first_line(err)}") from None


def _git(root: Path, *args: str) -> str | None:
    """`git <args>`'s output in `root`, or None where git, the repo or the object is missing."""
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_commit(root: Path = Path(".")) -> str:
    return (_git(root, "rev-parse", "HEAD") or "").strip() or "unknown"


def dvc_experiment() -> dict[str, str]:
    """The DVC experiment this process runs in: {"name", "baseline_rev"}, empty outside one.

    `dvc exp run` (in the workspace, --temp or queued) sets DVC_EXP_NAME and DVC_EXP_BASELINE_REV
    for every stage it runs; plain `dvc repro` sets neither."""
    found = {"name": os.environ.get("DVC_EXP_NAME"), "baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV")}
    return {k: v for k, v in found.items() if v}


def run_name(task: str) -> str:
    """What tells runs apart in the UI: the task and its DVC experiment, or the task and the start time (UTC)."""
    import time

    experiment = dvc_experiment().get("name")
    return f"{task}-{experiment}" if experiment else f"{task}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def task_params(params: Params, task: str) -> dict[str, object]:
    """The params one training of `task` reads, flattened as params.yaml names them: the seed, the trainer,
    and the task's section without the knobs only other tasks use (gesture logs no `attention`)."""
    from pipeline.tasks import get_task

    own = get_task(task).own_params(params.task(task).model_dump(mode="json"))
    return flatten({"seed": params.seed, "trainer": params.trainer.model_dump(), task: own})


def params_changed(params: Params, task: str, root: Path = Path(".")) -> list[str] | None:
    """The run's params (task_params) that differ from params.yaml at the git commit, as "key: committed ->
    used"; None when there is no committed params.yaml to compare with."""
    import yaml

    from pipeline.config import ConfigError, parse_params

    text = _git(root, "show", "HEAD:params.yaml")
    if text is None:
        return None
    try:
        committed = task_params(parse_params(yaml.safe_load(text), "HEAD:params.yaml"), task)
    except (yaml.YAMLError, ConfigError):
        return None
    used = task_params(params, task)
    return [f"{k}: {committed.get(k)} -> {v}" for k, v in used.items() if committed.get(k) != v]


def run_tags(params: Params, task: str, topology: str, root: Path = Path(".")) -> dict[str, str]:
    """Tags of a training run: what it trained, from which commit, under which DVC stage and experiment."""
    commit = git_commit(root)
    tags = {"task": task, "topology": topology, "git_commit": commit, "mlflow.source.git.commit": commit,
            "dvc_stage": os.environ.get("DVC_STAGE") or f"train@{task}",
            "devices": str(params.trainer.devices), "num_nodes": str(params.trainer.num_nodes),
            "strategy": params.trainer.strategy}
    experiment = dvc_experiment()
    if experiment:
        tags["dvc_experiment"] = experiment.get("name", "")
        tags["dvc_baseline_rev"] = experiment.get("baseline_rev", "")
    changed = params_changed(params, task, root)
    tags["params_differ_from_commit"] = "unknown" if changed is None else str(bool(changed)).lower()
    if changed:
        tags["params_changed"] = "; ".join(changed)[:4000]
    return tags


def prepared_digest(data_dir: Path) -> str:
    """The prepared data's DVC hash: dvc.lock's md5 of the folder ("<md5>.dir") when DVC runs this stage
    (DVC_STAGE set: DVC has just checked that entry against the folder); otherwise, or where dvc.lock has no
    entry, "sha256:" and the first 28 hex digits of the manifest's content hash.

    `data_dir` is relative to the stage's working directory, where dvc.lock lives (a DVC experiment's
    temporary workspace has its own)."""
    import yaml

    from pipeline.datasets.prepared import load_manifest

    lock = Path("dvc.lock")
    if os.environ.get("DVC_STAGE") and lock.exists() and not Path(data_dir).is_absolute():
        try:
            stages = yaml.safe_load(lock.read_text()).get("stages", {})
        except (OSError, yaml.YAMLError, AttributeError):
            stages = {}
        for stage in stages.values():
            for out in stage.get("outs", []) if isinstance(stage, dict) else []:
                if isinstance(out, dict) and out.get("path") == Path(data_dir).as_posix() and out.get("md5"):
                    return str(out["md5"])
    return "sha256:" + load_manifest(data_dir)["content_sha256"][:28]  # MLflow keeps 36 characters


def log_dataset(client, run_id: str, task: str, data_dir: Path) -> None:
    """The prepared data as the run's input dataset (context "training"): named after the task, the DVC hash
    as digest, the package that ships the data as source, the train split's arrays as schema and profile.
    Only this description is logged, never the data."""
    import json

    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from pipeline.datasets.prepared import load_manifest, load_split

    manifest = load_manifest(data_dir)
    arrays = load_split(data_dir, "train")
    target = {k: arrays.pop(k) for k in ("y", "tgt") if k in arrays}
    info = manifest.get("source", {})
    source = CodeDatasetSource({"package": f"{info.get('package', '?')} {info.get('version', '')}".strip(),
                                "license": info.get("license", ""), "what": info.get("what", ""),
                                "prepared": Path(data_dir).as_posix(), "builder": f"pipeline.datasets.{task}",
                                "counts": json.dumps(manifest.get("counts", {}), sort_keys=True)})
    dataset = mlflow.data.from_numpy(arrays, source=source, targets=target or None, name=task,
                                     digest=prepared_digest(data_dir))
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                            tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])])


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
    logger = MLFlowLogger(experiment_name=params.tracking.experiment, run_name=run_name(task), tracking_uri=uri,
                          tags=tags,
                          run_id=run_id, artifact_location=artifact_location(params, root), log_model=False,
                          synchronous=False)  # sqlite commits cost ~0.2 s each: log per step in the background
    with mlflow_uri(uri):
        logger.experiment  # noqa: B018  start the run now: its first use calls mlflow.set_tracking_uri
    return logger


TRAINING_CURVES = ("train_loss", "val_loss")  # what RecurrentModule logs per step and per epoch


def log_evaluation(params: Params, run_id: str, metrics: dict, paths: list[Path], root: Path = Path("."), *,
                   split: str = "test") -> None:
    """Evaluation results into the (finished) training run, without reopening it: every number in `metrics`
    as `<split>_<name>` (a nested dict such as the baseline as `<split>_<dict>_<name>`), and every file it wrote.

    A name the training already logs per epoch is left to it: charlm's evaluation loss on the val split is
    the best checkpoint's `val_loss`, already in that curve (one more point would bend it)."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(params, root))
    numbers = {f"{split}_{k.replace('.', '_')}": v for k, v in flatten(metrics).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in numbers.items()
                                       if k not in TRAINING_CURVES])
    for path in paths:
        if Path(path).is_dir():
            # plots/<task> -> evaluation/plots, samples/<task> -> evaluation/samples
            client.log_artifacts(run_id, str(path), artifact_path=f"evaluation/{Path(path).parent.name}")
        elif Path(path).exists():
            client.log_artifact(run_id, str(path), artifact_path="evaluation")


PIP_REQUIREMENTS = ["torch>=2.3", "lightning>=2.2", "mlflow>=3.0", "numpy", "pandas", "safetensors", "pydantic>=2.5",
                    "pyyaml", "torchmetrics"]  # explicit: environment capture took 8.7 s here, this ~1 s


def _signature_and_example(model_dir: Path):
    """A natural input example per topology (from the model's own vocabulary) and its signature."""
    import json

    import numpy as np
    import pandas as pd
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    info = json.loads((model_dir / "config.json").read_text())
    topology, vocab = info["topology"], info["hparams"]["vocab"]
    # generators: only the prime (seed note) is required. A signature inferred from the example would require
    # length and temperature, and MLflow drops columns a signature lacks (top_k, seed) before predict sees them
    options = [ColSpec("long", "length", required=False), ColSpec("double", "temperature", required=False)]
    if topology == "char_lm":
        sampling = [ColSpec("long", "top_k", required=False), ColSpec("long", "seed", required=False)]
        return (Schema([ColSpec("string", "prime"), *options, *sampling]),
                pd.DataFrame({"prime": ["ROMEO:"], "length": [40], "temperature": [0.8]}))
    if topology == "seq2seq":
        return None, pd.DataFrame({"text": ["three hundred and forty-two"]})
    if topology == "one_to_many":
        return (Schema([ColSpec("string", "seed"), *options]),
                pd.DataFrame({"seed": [vocab["tokens"][2]], "length": [16], "temperature": [0.0]}))
    if "tokens" in vocab:
        return None, pd.DataFrame({"text": ["a gripping, beautifully acted film"]})
    shape = info["hparams"]["dims"]["input_shape"]
    if topology == "one_to_one":
        example = np.zeros((1, *shape), np.float32)
        spec = TensorSpec(np.dtype(np.float32), (-1, *shape))
    else:  # variable-length sequences: time is -1 too
        example = np.zeros((1, 50, shape[-1]), np.float32)
        spec = TensorSpec(np.dtype(np.float32), (-1, -1, shape[-1]))
    return Schema([spec]), example


def log_and_register(params: Params, name: str, model_dir: Path, run_id: str, root: Path = Path(".")) -> str:
    """Log models/<name>/ into its run as a pyfunc (models from code) and register it; the version."""
    import tempfile

    import mlflow
    from mlflow.models import Model, infer_signature

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
        if inputs is not None:
            signature.inputs = inputs
        # Model.log with run_id (what mlflow.pyfunc.log_model calls) logs into the finished training run
        # without reopening it: mlflow.start_run(run_id) would set its end time to now
        logged = Model.log(
            artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id,
            python_model=str(package / "pyfunc_model.py"), artifacts={"model": str(weights)},
            code_paths=[str(package)], pip_requirements=PIP_REQUIREMENTS, signature=signature, input_example=example)
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
