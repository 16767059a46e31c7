"""Stage `evaluate`: models/<task>/ + the held-out split -> metrics, plot data, figures and samples.

    python -m pipeline evaluate <task>

The command (DVC stage `evaluate@<task>`) also writes the task's gate explorer page and probe numbers
(explorer/<task>.html, probes/<task>.json: pipeline.explore), in the same process: one start of torch,
Lightning and MLflow (about 5 s) per task instead of two.

Runs on one device, so no sample counts twice. Metrics come from torchmetrics. What it writes:

    metrics/<task>.json         numbers only, the task's key metric first (a DVC metric, kept in git):
                                {"accuracy": .., "f1_macro": .., "baseline": {"accuracy": ..},
                                 "long_memory_units": ..}
    plots/saturation/<task>.json  plot data (kept in git, so `dvc plots diff` compares experiments; one
    plots/confusion/<task>.json   folder per kind, so dvc.yaml's `plots:` names folders, not tasks): a row
                                per gate and unit; classifiers' {"actual", "predicted"} row per test
                                sample or step (DVC's `confusion` template), [] for other topologies
    figures/<task>/             pictures (DVC cache): gate_saturation.png, gate_heatmaps.png, confusion.png
    samples/<task>/             evaluation.json (key metric name, direction, split, counts, the
                                baseline's name, the trace check: what is not a metric) and samples

The gate traces of the held-out inputs become saturation statistics and heat maps. The task's
topology object (pipeline/topologies.py) computes the metrics, the baseline and the samples.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from pipeline.atomic import atomic_dir, check_file_targets, write_file_atomic
from pipeline.config import Params, PipelineError
from pipeline.tasks import Task, get_task

DATA_ROOT, MODELS_ROOT = Path("data/prepared"), Path("models")
METRICS_ROOT, PLOTS_ROOT, SAMPLES_ROOT = Path("metrics"), Path("plots"), Path("samples")
FIGURES_ROOT = Path("figures")
PLOT_KINDS = ("saturation", "confusion")  # plots/<kind>/<task>.json: one folder per kind, drawn by dvc.yaml
INFO_FILE = "evaluation.json"  # in samples/<task>/: what describes the metrics without being one
TRACE_SAMPLES = 256  # held-out inputs whose gates feed the saturation statistics


def _trace_and_labels(model, dm, split, task: Task):
    """The gate trace of the first held-out inputs, and per-step labels for the first one's heat map."""
    batch = next(iter(dm.loader(split, batch_size=TRACE_SAMPLES)))
    with torch.no_grad():
        trace = model.trace(batch)
    labels = task.topology.heatmap_labels(batch, dm.vocab)
    if labels is not None:
        labels = labels[: int(trace.mask[0].sum())]  # one label per real step of the first sequence
    return trace, labels


def evaluate(task_name: str, params: Params, *, data_root: Path = DATA_ROOT, models_root: Path = MODELS_ROOT,
             metrics_root: Path = METRICS_ROOT, plots_root: Path = PLOTS_ROOT, samples_root: Path = SAMPLES_ROOT,
             figures_root: Path = FIGURES_ROOT, track: bool = True, root: Path | None = None) -> str:
    from pipeline import gates
    from pipeline.datasets.datamodule import PreparedDataModule
    from pipeline.models.saved import load_trained

    task, cfg = get_task(task_name, params), params.task(task_name)
    model, info = load_trained(models_root / task_name)
    torch.manual_seed(params.seed)
    dm = PreparedDataModule(data_root / task_name, cfg.train.batch_size, params.seed, cfg.train.block_size)
    split = task.eval_split
    metrics_file = metrics_root / f"{task_name}.json"
    figures_dir, samples_dir = figures_root / task_name, samples_root / task_name
    plot_files = {kind: plots_root / kind / f"{task_name}.json" for kind in PLOT_KINDS}
    # what could stop the run at its end is checked before anything is computed or written
    check_file_targets(metrics_file, *plot_files.values())
    if track and info.get("mlflow_run_id"):
        from pipeline import tracking

        tracking.check_run(params, info["mlflow_run_id"], root)
    # figures and samples swap in together, only once everything is computed; then the plot data; the metrics last
    with tempfile.TemporaryDirectory() as staging, atomic_dir(figures_dir) as tmp_figures, \
            atomic_dir(samples_dir) as tmp_samples:
        tmp_plots = Path(staging) / "plots"
        tmp_plots.mkdir()
        with torch.no_grad():
            metrics, baseline = task.topology.evaluate(model, dm, split, tmp_plots, tmp_samples)
        if task.key_metric not in metrics:
            raise PipelineError(f"{task_name}: the evaluator did not report the key metric {task.key_metric}")
        for picture in tmp_plots.glob("*.png"):  # evaluators draw next to their data: pictures go to the cache
            picture.replace(tmp_figures / picture.name)
        trace, labels = _trace_and_labels(model, dm, split, task)
        stats = gates.saturation(trace)
        gates.plot_saturation(stats, tmp_figures / "gate_saturation.png")
        gates.plot_heatmaps(trace, tmp_figures / "gate_heatmaps.png", batch_index=0, labels=labels)
        (tmp_plots / "saturation.json").write_text(json.dumps(gates.saturation_plot_data(stats)))
        (tmp_samples / "gate_saturation.json").write_text(json.dumps(stats, indent=1))
        key_first = [task.key_metric, *(k for k in metrics if k != task.key_metric)]
        result = {**{k: round(float(metrics[k]), 6) for k in key_first},
                  "baseline": {k: round(float(v), 6) for k, v in baseline.items() if k != "name"},
                  "long_memory_units": len(stats["summary"]["long_memory_units"])}
        about = {"key_metric": task.key_metric, "higher_is_better": task.higher_is_better, "split": split,
                 "samples": int(len(next(iter(dm.split(split).values())))), "baseline": baseline["name"],
                 "trace_reconstruction_error": float(trace.reconstruction_error)}
        (tmp_samples / INFO_FILE).write_text(json.dumps(about, indent=1) + "\n")
        plot_texts = {kind: (tmp_plots / f"{kind}.json").read_text() if (tmp_plots / f"{kind}.json").exists()
                      else "[]" for kind in PLOT_KINDS}  # no confusion for a generator: an empty plot
    for kind, path in plot_files.items():
        write_file_atomic(path, plot_texts[kind])
    write_file_atomic(metrics_file, json.dumps(result, indent=1) + "\n")
    if track and info.get("mlflow_run_id"):
        from pipeline import tracking

        with tempfile.TemporaryDirectory() as staging:  # MLflow: evaluation/plots/{saturation,confusion}.json
            logged = Path(staging) / "plots" / task_name  # logged by its parent's name
            logged.mkdir(parents=True)
            for kind in PLOT_KINDS:
                if plot_texts[kind] != "[]":
                    (logged / f"{kind}.json").write_text(plot_texts[kind])
            tracking.log_evaluation(params, info["mlflow_run_id"], result,
                                    [metrics_file, logged, figures_dir, samples_dir], root=root, split=split)
    shown = ", ".join(f"{k} {result[k]:.4f}" for k in metrics)
    return f"{task_name}: {shown} (baseline {baseline['name']}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in baseline.items() if k != "name") + f") on {about['samples']} {split} samples"


def stage(task_name: str, params: Params) -> str:
    """`python -m pipeline evaluate <task>`: `evaluate`, then the explorer page and probes (`pipeline.explore`),
    each logged to the task's MLflow run. Each output is written atomically; a failure exits non-zero, so DVC
    records nothing and reruns the stage."""
    from pipeline.explore import PAGES_ROOT, PROBES_ROOT, explore

    check_file_targets(PAGES_ROOT / f"{task_name}.html", PROBES_ROOT / f"{task_name}.json")  # before the metrics
    return evaluate(task_name, params) + "\n" + explore(task_name, params)
