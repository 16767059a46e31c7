"""MLflow, in one place: where the store is, the Lightning logger, artifacts, models and the registry.

The tracking URI comes from params (`tracking.uri`, default sqlite:///mlflow.db: the registry
needs a database) unless MLFLOW_TRACKING_URI is set. Relative sqlite paths and the artifact
location are anchored at the project root (`project_root()`), resolved at every run, not at
whatever directory a process started in: from a subfolder of the repo, and from the temporary
workspace DVC runs a queued or `--temp` experiment in (`<root>/.dvc/tmp/exps/...`), everything
lands in `<root>/mlflow.db` and `<root>/mlruns/`, so `mlflow ui --backend-store-uri
sqlite:///mlflow.db` from the repo root shows everything. A repo that was copied or moved
carries a store whose locations name the old folder: the first run in the new place rewrites
them (`relocate_store`), so it never writes into the original. Only global rank 0 ever talks to
MLflow.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import closing, contextmanager
from pathlib import Path

from pipeline.config import Params, PipelineError, first_line


def is_global_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


MARKERS = ("params.yaml", ".dvc")  # a folder holding either is a workspace root
DVC_TEMP_WORKSPACES = (".dvc", "tmp", "exps")  # DVC 3 runs queued and --temp experiments in <root>/.dvc/tmp/exps/


def workspace_root(start: Path | None = None) -> Path:
    """The folder this process works in: the nearest folder, from `start` (default: the current one)
    upwards, that holds params.yaml or .dvc/. For a queued experiment that is DVC's temporary copy;
    without any such folder, `start` itself."""
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / marker).exists() for marker in MARKERS):
            return folder
    return here


def project_root(start: Path | None = None) -> Path:
    """The repository whose MLflow store a run belongs to: the workspace root, or for DVC's temporary
    experiment workspaces (`<root>/.dvc/tmp/exps/<celery|tmp...>/<name>`) the `<root>` they were copied
    from. DVC also exports that root to stage commands as DVC_ROOT; the path decides, since a queued
    run's DVC_ROOT and a workspace run's are the same folder by construction."""
    workspace = workspace_root(start)
    parts, n = workspace.parts, len(DVC_TEMP_WORKSPACES)
    for i in range(1, len(parts) - n + 1):  # the outermost .dvc/tmp/exps wins: a copy inside a copy is one repo
        if parts[i : i + n] == DVC_TEMP_WORKSPACES:
            return Path(*parts[:i])
    return workspace


def dvc_experiment(root: Path | None = None) -> dict[str, str]:
    """Where this run sits in DVC and git, as MLflow tags: inside `dvc exp run` (workspace, --temp or queued)
    {"dvc_experiment": its name, "dvc_baseline_rev": the commit it started from} (DVC sets DVC_EXP_NAME and
    DVC_EXP_BASELINE_REV in every stage command of an experiment); and always, when git can tell,
    "params_modified": "true" if the workspace's params.yaml differs from its commit's (an experiment's
    overrides, or uncommitted edits), else "false"."""
    found = {"dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
             "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", "")}
    try:
        here = workspace_root(root)
        committed = subprocess.run(["git", "show", "HEAD:./params.yaml"], cwd=here, capture_output=True, timeout=10)
        if committed.returncode == 0 and (here / "params.yaml").is_file():
            found["params_modified"] = str(committed.stdout != (here / "params.yaml").read_bytes()).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return {k: v for k, v in found.items() if v}


def _root(root: Path | None) -> Path:
    return project_root() if root is None else Path(root)


def tracking_uri(params: Params, root: Path | None = None) -> str:
    """The store's URI: MLFLOW_TRACKING_URI, else params' `tracking.uri`; relative paths under `root`
    (default: project_root())."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str((_root(root) / uri[len(prefix):]).resolve())
    elif "://" not in uri:  # a plain folder: a file store
        uri = str((_root(root) / uri).resolve())
    return uri


def artifact_location(params: Params, root: Path | None = None) -> str:
    """Where new experiments keep artifacts: params' `tracking.artifact_location`, relative to `root`."""
    location = params.tracking.artifact_location
    return location if "://" in location else str((_root(root) / location).resolve())


def _local_path(location: str) -> str | None:
    """The folder of a local artifact location ('/a/b' or 'file:///a/b'); None for remote ones."""
    if location.startswith("file://"):
        return location[len("file://"):]
    return location if location.startswith("/") else None


def relocate_store(params: Params, root: Path | None = None) -> str | None:
    """Make a copied or moved repo's store point into itself; the old root when it rewrote anything.

    MLflow keeps the experiment's artifact location, every run's artifact URI and every model's
    storage location as absolute paths fixed when they were made. When the store is this
    project's own sqlite file (default params) and the experiment's local artifact location is
    `<old>/<artifact_location>` for another folder <old>, every text value in the database that
    starts with `<old>/` (or `file://<old>/`) is rewritten to start with `<root>/`: the repo
    moved, and the paths inside it move with it. A local location outside the project that is
    not of that form is refused in one line rather than written to.
    """
    import sqlite3

    root = _root(root).resolve()
    uri, rel = tracking_uri(params, root), params.tracking.artifact_location
    db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if db is None or "://" in rel or Path(rel).is_absolute() or not db.is_file() or not db.is_relative_to(root):
        return None  # not this project's own store with a project-relative artifact location
    with closing(sqlite3.connect(db, timeout=30)) as con, con:  # one transaction, then closed
        try:
            row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?",
                              (params.tracking.experiment,)).fetchone()
        except sqlite3.Error:  # not initialised yet: MLflow creates the tables on first use
            return None
        local = _local_path(row[0]) if row and row[0] else None
        if local is None or Path(local).is_relative_to(root):
            return None
        suffix = "/" + Path(rel).as_posix().strip("/")
        if not local.endswith(suffix):
            raise PipelineError(f"MLflow experiment {params.tracking.experiment!r} keeps its artifacts in {local}, "
                                f"outside this project {root}; set tracking.artifact_location or move them")
        old = local[: -len(suffix)]
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [c[1] for c in con.execute(f'PRAGMA table_info("{table}")')
                       if any(k in (c[2] or "").upper() for k in ("CHAR", "TEXT", "CLOB"))]
            for column in columns:
                for before, after in ((f"file://{old}/", f"file://{root}/"), (f"{old}/", f"{root}/")):
                    con.execute(f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                                f'WHERE substr("{column}", 1, ?) = ?',
                                (after, len(before) + 1, len(before), before))
                con.execute(f'UPDATE "{table}" SET "{column}" = ? WHERE "{column}" IN (?, ?)',
                            (f"{root}{suffix}", local, f"file://{local}"))
    return old


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


def experiment_id(params: Params, root: Path | None = None) -> str:
    """The project's experiment (created on first use, relocated if the repo moved); a clear error if the
    store is unusable."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params, root)
    relocate_store(params, root)
    try:
        with _fail_fast():
            client = MlflowClient(uri)
            found = client.get_experiment_by_name(params.tracking.experiment)
            if found is not None:
                return found.experiment_id
            return client.create_experiment(params.tracking.experiment, artifact_location(params, root))
    except Exception as err:  # MLflow raises many kinds; the user needs the first line
        raise PipelineError(f"MLflow tracking store {uri} is unreachable or unwritable: {first_line(err)}") from None


def git_commit(root: Path | None = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace_root(root), capture_output=True, text=True,
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


def make_logger(params: Params, task: str, tags: dict, run_id: str | None = None, root: Path | None = None):
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


def log_evaluation(params: Params, run_id: str, metrics: dict, paths: list[Path], root: Path | None = None) -> None:
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


def log_and_register(params: Params, name: str, model_dir: Path, run_id: str, root: Path | None = None) -> str:
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
        if inputs is not None:
            signature.inputs = inputs
        with mlflow.start_run(run_id=run_id):
            logged = mlflow.pyfunc.log_model(
                name="model", python_model=str(package / "pyfunc_model.py"), artifacts={"model": str(weights)},
                code_paths=[str(package)], pip_requirements=PIP_REQUIREMENTS, signature=signature,
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
