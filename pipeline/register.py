"""Stage `register`: every task's trained model -> a version of the registered model named after the task.

    python -m pipeline register

Each model is logged into its training run as an MLflow pyfunc (weights + config + this package
as code; no pickles), registered as a new version with its metrics as tags, and the alias
`champion` moves to it only when its key metric is at least as good as the current champion's.
Registering the same run twice reuses its version. registry/<task>.json is the receipt.
A failure part-way deletes the version it made and leaves the alias where it was.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import atomic_dir
from pipeline.config import Params, PipelineError
from pipeline.tasks import Task, get_task

MODELS_ROOT, METRICS_ROOT, REGISTRY_ROOT = Path("models"), Path("metrics"), Path("registry")
ALIAS = "champion"


def is_better(new: float, old: float | None, higher_is_better: bool) -> bool:
    """At least as good moves the alias (a retrain with equal quality becomes champion)."""
    if old is None:
        return True
    return new >= old if higher_is_better else new <= old


def register_task(task_name: str, params: Params, *, models_root: Path = MODELS_ROOT,
                  metrics_root: Path = METRICS_ROOT, root: Path | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    task = get_task(task_name, params)
    model_dir, metrics_file = models_root / task_name, metrics_root / f"{task_name}.json"
    if not metrics_file.exists():
        raise PipelineError(f"{metrics_file}: no metrics; run `dvc repro evaluate@{task_name}`")
    metrics = json.loads(metrics_file.read_text())
    info = json.loads((model_dir / "config.json").read_text())
    run_id = info.get("mlflow_run_id")
    if not run_id:
        raise PipelineError(f"{model_dir}/config.json has no MLflow run id: train with tracking on")
    tracking.experiment_id(params, root)  # one clear line if the store is unusable
    client = MlflowClient(tracking.tracking_uri(params, root))
    key, new_value = task.key_metric, float(metrics[task.key_metric])

    version = tracking.find_version(client, task_name, run_id)
    made_here = version is None
    if made_here:
        version = tracking.log_and_register(params, task_name, model_dir, run_id, root=root)
    try:
        tags = {f"metric.{k}": str(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        tags.update({"key_metric": key, "higher_is_better": str(task.higher_is_better), "task": task_name,
                     "topology": task.topology_name, "fingerprint": info.get("fingerprint", "")})
        for k, v in tags.items():
            client.set_model_version_tag(task_name, version, k, v)
        champion = tracking.alias_version(client, task_name, ALIAS)
        current = champion is not None and str(champion.version) == str(version)  # this run is the champion
        old_value = None
        if champion is not None and not current:
            old_value = float(champion.tags.get(f"metric.{key}", "nan"))
            old_value = None if old_value != old_value else old_value
        move = champion is None or current or is_better(new_value, old_value, task.higher_is_better)
        if move:
            client.set_registered_model_alias(task_name, ALIAS, str(version))
        if champion is None:
            why = "first version"
        elif current:
            why = "already champion"
        else:
            why = (f"{key} {new_value:.4f} {'>=' if task.higher_is_better else '<='} champion v{champion.version}'s "
                   f"{old_value}" if move else f"{key} {new_value:.4f} is worse than champion v{champion.version}'s "
                   f"{old_value:.4f}")
        if made_here or (move and not current):  # an older version's description keeps its own reason
            describe_version(client, task, str(version), run_id, metrics, why, champion=move)
        describe_model(client, task, run_id)
    except BaseException:
        if made_here:  # no half-made version: its tags, the alias or the descriptions failed
            client.delete_model_version(task_name, str(version))
        raise
    return {"name": task_name, "version": int(version), "run_id": run_id, "key_metric": key, "value": new_value,
            "alias": ALIAS, "alias_moved": bool(move and not current),
            "champion_version": int(version) if move else int(champion.version), "why": why,
            "new_version": made_here}


def describe_model(client, task: Task, run_id: str) -> None:
    """The registered model's description: task, topology, the data it learns from (the training run's input
    dataset), and how the champion is chosen."""
    task_name = task.name
    data = ""
    run = client.get_run(run_id)
    for dataset_input in run.inputs.dataset_inputs if run.inputs else []:
        try:
            what = json.loads(dataset_input.dataset.source).get("tags", {}).get("what")
        except (ValueError, AttributeError):
            what = None
        if what:
            data = f", trained on {what.rstrip('.')}"
    client.update_registered_model(task_name, description=(
        f"Task `{task_name}`: a {task.topology_name} model on GateLSTM{data}. One version per training run, "
        f"registered by the `register` stage; the alias `{ALIAS}` marks the best {task.key_metric} on the "
        f"{task.eval_split} split ({'higher' if task.higher_is_better else 'lower'} is better). Each version's "
        "description says why the champion moved to it or stayed."))


def describe_version(client, task: Task, version: str, run_id: str, metrics: dict, why: str,
                     champion: bool) -> None:
    """A version's description: its run, its key metric on the evaluation split, and why `champion` moved to
    it (champion=True) or stayed where it was."""
    task_name = task.name
    key, split = task.key_metric, task.eval_split
    samples = metrics.get("samples")
    on = f"{samples} {split} samples" if isinstance(samples, int) else f"the {split} split"
    verdict = f"became `{ALIAS}` ({why})" if champion else f"left `{ALIAS}` where it was ({why})"
    run_name = client.get_run(run_id).info.run_name
    client.update_model_version(task_name, version, description=(
        f"{task_name} ({task.topology_name}) from run {run_name} ({run_id}): {key} {float(metrics[key]):.4f} on {on} "
        f"({'higher' if task.higher_is_better else 'lower'} is better). At registration it {verdict}."))


def register_all(params: Params, *, registry_root: Path = REGISTRY_ROOT, **kwargs) -> str:
    metrics_root = kwargs.get("metrics_root", METRICS_ROOT)
    missing = [t for t in params.tasks if not (metrics_root / f"{t}.json").exists()]
    if missing:  # check everything before registering anything
        raise PipelineError(f"no metrics for {', '.join(missing)}; run `dvc repro evaluate`")
    receipts = [register_task(task, params, **kwargs) for task in params.tasks]
    with atomic_dir(registry_root) as tmp:
        for receipt in receipts:
            (tmp / f"{receipt['name']}.json").write_text(json.dumps(receipt, indent=1) + "\n")
    return "registered: " + ", ".join(
        f"{r['name']} v{r['version']}{' (champion)' if r['champion_version'] == r['version'] else ''}"
        for r in receipts)
