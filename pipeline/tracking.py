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

A training run is what the MLflow UI shows as one row: named after its task and DVC experiment,
tagged with the commit, the DVC stage and experiment, and whether params differ from the commit;
only the params its task reads; the prepared data as its input dataset (DVC hash as digest);
ended when training ends, so its duration is the training's. Evaluation (`<split>_<metric>`)
and registration log into it afterwards without reopening it.
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


# The MLflow 3 UI opens an experiment without this tag on its GenAI overview (traces, judges);
# a model-training one opens on its runs. Set when missing: a kind chosen in the UI stays.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(params: Params, root: Path | None = None) -> str:
    """The project's experiment (created on first use, marked as model training, relocated if the repo
    moved); a clear error if the
    store is unusable."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params, root)
    relocate_store(params, root)
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


def check_run(params: Params, run_id: str, root: Path | None = None) -> None:
    """The store answers (in seconds, not MLflow's minutes of retries) and holds `run_id`, the training run a
    model's evaluation logs into: PipelineError in one line otherwise. A missing sqlite file is not created."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params, root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise PipelineError(f"MLflow tracking store {uri} does not exist, so it cannot hold this model's training "
                            f"run {run_id}: use the store the model was trained with (tracking.uri or "
                            "MLFLOW_TRACKING_URI), or train it again")
    try:
        with _fail_fast():
            MlflowClient(uri).get_run(run_id)
    except Exception as err:  # MLflow raises many kinds; the user needs the first line
        raise PipelineError(f"MLflow tracking store {uri}: cannot read this model's training run {run_id}: "
                            f"{first_line(err)}") from None


def _git(root: Path | None, *args: str) -> str | None:
    """`git <args>`'s output in `root`, or None where git, the repo or the object is missing."""
    try:
        done = subprocess.run(["git", *args], cwd=workspace_root(root), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_commit(root: Path | None = None) -> str:
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

    own = get_task(task, params).own_params(params.task(task).model_dump(mode="json"))
    return flatten({"seed": params.seed, "trainer": params.trainer.model_dump(), task: own})


def params_changed(params: Params, task: str, root: Path | None = None) -> list[str] | None:
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


def run_tags(params: Params, task: str, topology: str, root: Path | None = None) -> dict[str, str]:
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


def log_dataset(client, run_id: str, task: str, data_dir: Path, builder: str | None = None) -> None:
    """The prepared data as the run's input dataset (context "training"): named after the task, the DVC hash
    as digest, the package that ships the data as source, `builder` (the source's reader and files), the train
    split's arrays as schema and profile.
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
                                "prepared": Path(data_dir).as_posix(),
                                "builder": builder or f"pipeline.datasets.{task}",
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


def make_logger(params: Params, task: str, tags: dict, run_id: str | None = None, root: Path | None = None):
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


def log_evaluation(params: Params, run_id: str, metrics: dict, paths: list[Path], root: Path | None = None, *,
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


# What loading and predicting import (the pipeline package itself travels as code): no data-source packages,
# no DVC. Lightning stays: every model class is a LightningModule. Pinned at logging time by pip_requirements().
PIP_REQUIREMENTS = ["torch", "lightning", "mlflow", "numpy", "pandas", "safetensors", "pydantic", "pyyaml"]


def pip_requirements() -> list[str]:
    """PIP_REQUIREMENTS pinned to the installed versions (explicit: environment capture took 8.7 s here, this
    ~1 s). A local version label is dropped as MLflow does (torch 2.13.0+cpu -> torch==2.13.0), so pip can
    install it from the default index; which build (CPU, CUDA) it takes is the serving machine's choice."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in PIP_REQUIREMENTS]


def _signature_and_example(model_dir: Path, params: Params | None = None):
    """(input schema, input example) of a trained model: what its pyfunc predict takes.

    The input schema is None for every model: pipeline/serving_inputs.py checks every input itself (one-line
    errors naming row and column) and MLflow's schema types each refuse inputs the contract takes. Measured with
    MLflow 3.17: a `long` column refuses a batch where only some rows set it (float64 with NaN), `double` refuses
    a pandas int64 column (`"length": [300]`), `any` breaks CSV (no pandas dtype: a 400 with a stack trace)
    and turns `{"inputs": {"text": [...]}}` into one row, a `string` column answers a JSON number with MLflow's
    several-line message, and a tensor spec refuses float64 arrays and series of different lengths. Without a
    schema MLflow hands predict what the payload parses to, in every format. The examples are real inputs in
    the units predict takes: the topology's (Topology.input_example), from the task's source where it has one
    (feature models: pipeline.datasets.<source>.example()). `params`: the task's section (default: a built-in
    task's)."""
    import json

    from pipeline.tasks import get_task
    from pipeline.topologies import topology_of

    info = json.loads((model_dir / "config.json").read_text())
    task = get_task(info["task"], params)
    source_example = task.source.example(task.section.data)
    return None, topology_of(info).input_example(info, source_example)


def log_and_register(params: Params, name: str, model_dir: Path, run_id: str, root: Path | None = None) -> str:
    """Log models/<name>/ into its run as a pyfunc (models from code) and register it; the version."""
    import tempfile

    import mlflow
    from mlflow.models import Model, infer_signature

    inputs, example = _signature_and_example(model_dir, params)
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
        # Model.log with run_id (what mlflow.pyfunc.log_model calls) logs into the finished training run
        # without reopening it: mlflow.start_run(run_id) would set its end time to now
        logged = Model.log(
            artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id,
            python_model=str(package / "pyfunc_model.py"), artifacts={"model": str(weights)},
            code_paths=[str(package)], pip_requirements=pip_requirements(), signature=signature, input_example=example)
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
