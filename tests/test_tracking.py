"""MLflow end to end on tiny models: what a tracked training and its evaluation record, the registry and its
champion alias, pyfunc round trips from `models:/<task>@champion`, the `sample` CLI, an unusable store, and
`mlflow server` over the same store.

Everything lives in one temporary sqlite store and artifact folder per module (params, never the
environment: MLFLOW_TRACKING_URI is unset around every test).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from tiny import TASKS, tiny_raw_params

from pipeline import tracking
from pipeline.config import PipelineError, parse_params
from pipeline.models.saved import load_trained
from pipeline.register import ALIAS, is_better, register_all, register_task
from pipeline.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
ENV = "MLFLOW_TRACKING_URI"


def no_env_uri(mp: pytest.MonkeyPatch) -> None:
    """Unset MLFLOW_TRACKING_URI now, and again when `mp` undoes (MLflow may export it meanwhile)."""
    mp.setenv(ENV, "unset-me")  # recorded as "was not set" (or its value): undo restores that
    mp.delenv(ENV)


@pytest.fixture(autouse=True)
def _params_win(monkeypatch):
    no_env_uri(monkeypatch)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Prepared, trained (tracked) and evaluated tiny digits, translation and charlm models in one store."""
    from pipeline.evaluate import evaluate
    from pipeline.prepare import prepare
    from pipeline.train import train

    tmp = tmp_path_factory.mktemp("tracking")
    params = parse_params(tiny_raw_params(tmp))
    ns = SimpleNamespace(tmp=tmp, params=params, data=tmp / "data", models=tmp / "models",
                         metrics=tmp / "metrics", uri=f"sqlite:///{tmp}/mlflow.db")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        no_env_uri(mp)
        torch.set_num_threads(1)  # other processes share these 2 cores: one thread avoids the stalls
        ns.trained = {}  # task -> (run info right after training, time evaluation began)
        for task in TASKS:
            prepare(task, params, ns.data)
            train(task, params, data_root=ns.data, models_root=ns.models, ckpt_root=tmp / "ckpt", root=REPO)
            run_id = info(ns.models, task)["mlflow_run_id"]
            ns.trained[task] = (client(ns).get_run(run_id).info, int(time.time() * 1000))
            evaluate(task, params, data_root=ns.data, models_root=ns.models, metrics_root=ns.metrics,
                     plots_root=tmp / "plots", samples_root=tmp / "samples", figures_root=tmp / "figures", root=REPO)
        yield ns
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def registered(store):
    with pytest.MonkeyPatch.context() as mp:
        no_env_uri(mp)
        return {task: register(store, task) for task in TASKS}


def register(store, task: str, models: Path | None = None, metrics: Path | None = None) -> dict:
    return register_task(task, store.params, models_root=models or store.models, metrics_root=metrics or store.metrics,
                         root=REPO)


def client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(store.uri)


def info(models: Path, task: str) -> dict:
    return json.loads((models / task / "config.json").read_text())


def versions(store, task: str) -> list[str]:
    return sorted((str(v.version) for v in client(store).search_model_versions(f"name='{task}'")), key=int)


def champion(store, task: str):
    return client(store).get_model_version_by_alias(task, ALIAS)


# --- the training run and its evaluation ----------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_training_run_holds_params_metrics_tags_and_evaluation(store, task):
    c, config = client(store), info(store.models, task)
    run = c.get_run(config["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == tracking.experiment_id(store.params)
    params = run.data.params
    assert params[f"{task}.model.hidden_size"] == "16" and params["seed"] == "3"
    assert params[f"{task}.train.max_epochs"] == str(config["epochs"])
    assert params[f"{task}.train.lr"] == str(store.params.task(task).train.lr)
    assert params["trainer.strategy"] == "auto" and params["trainer.devices"] == "1"

    steps = [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")]
    assert config["global_step"] > 0 and steps == list(range(config["global_step"]))  # one per step
    val = c.get_metric_history(run.info.run_id, "val_loss")
    assert len(val) == config["epochs"]  # one per epoch (no sanity-check value)
    assert min(v.value for v in val) == pytest.approx(config["best_val_loss"], rel=1e-6)

    tags = run.data.tags
    assert tags["task"] == task and tags["topology"] == get_task(task).topology_name
    assert tags["dvc_stage"] == f"train@{task}"
    assert re.fullmatch(rf"{task}-20\d{{6}}-\d{{6}}", tags["mlflow.runName"])  # task and start time: runs differ
    assert "dvc_experiment" not in tags  # not run by `dvc exp run`
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"]) and tags["mlflow.source.git.commit"] == tags["git_commit"]
    subprocess.run(["git", "cat-file", "-e", f"{tags['git_commit']}^{{commit}}"], cwd=REPO, check=True)
    # the tiny params are not the committed params.yaml: marked, with what differs (the seed: 3 here)
    assert tags["params_differ_from_commit"] == "true" and "seed: 1337 -> 3" in tags["params_changed"].split("; ")

    # evaluation metrics are named after the split evaluated: charlm's text has no test part
    metrics = json.loads((store.metrics / f"{task}.json").read_text())
    split = get_task(task).eval_split
    about = json.loads((store.tmp / "samples" / task / "evaluation.json").read_text())  # what describes them
    assert about["split"] == split == ("val" if task == "charlm" else "test")
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numbers |= {f"baseline_{k}": v for k, v in metrics["baseline"].items() if isinstance(v, float)}
    if task == "charlm":  # its evaluation loss is the best checkpoint's val_loss, already in that curve
        assert numbers.pop("loss") == pytest.approx(config["best_val_loss"], rel=1e-5)
        assert not [k for k in run.data.metrics if k.startswith("test_")]
    assert {k: run.data.metrics[f"{split}_{k}"] for k in numbers} == pytest.approx(numbers)
    top = {a.path for a in c.list_artifacts(run.info.run_id, "evaluation")}
    assert top == {f"evaluation/{task}.json", "evaluation/plots", "evaluation/figures", "evaluation/samples"}
    plots = {Path(a.path).name for a in c.list_artifacts(run.info.run_id, "evaluation/plots")}
    figures = {Path(a.path).name for a in c.list_artifacts(run.info.run_id, "evaluation/figures")}
    samples = {Path(a.path).name for a in c.list_artifacts(run.info.run_id, "evaluation/samples")}
    assert {"gate_saturation.png", "gate_heatmaps.png"} <= figures and "saturation.json" in plots
    assert {"gate_saturation.json", "evaluation.json"} <= samples
    if task == "digits":
        assert "confusion.png" in figures and "confusion.json" in plots
    else:
        assert {"translation": "translations.tsv", "charlm": "samples.txt"}[task] in samples
    import mlflow

    logged = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=f"evaluation/{task}.json",
                                                 tracking_uri=store.uri, dst_path=str(store.tmp / "downloads" / task))
    assert json.loads(Path(logged).read_text()) == metrics


# --- what the MLflow UI shows: experiment kind, run names and tags, params, duration, dataset ---------------


def test_experiment_is_marked_as_model_training(store, tmp_path):
    from mlflow.tracking import MlflowClient

    experiment = client(store).get_experiment(tracking.experiment_id(store.params))
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # an experiment made before the tag existed gets it; a kind chosen in the UI stays
    old = MlflowClient(store.uri)
    made = {"plain": old.create_experiment("plain", str(tmp_path)),
            "chosen": old.create_experiment("chosen", str(tmp_path), tags={tracking.EXPERIMENT_KIND_TAG: "finetuning"})}
    for name, want in (("plain", "custom_model_development"), ("chosen", "finetuning")):
        params = parse_params({"tracking": {"uri": store.uri, "experiment": name, "artifact_location": str(tmp_path)}})
        assert tracking.experiment_id(params) == made[name]
        assert old.get_experiment_by_name(name).tags[tracking.EXPERIMENT_KIND_TAG] == want


def test_a_dvc_experiment_names_and_tags_its_run(store, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "fuzzy-lamp")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    monkeypatch.setenv("DVC_STAGE", "train@translation")
    assert tracking.dvc_experiment() == {"name": "fuzzy-lamp", "baseline_rev": "a" * 40}
    assert tracking.run_name("translation") == "translation-fuzzy-lamp"
    tags = tracking.run_tags(store.params, "translation", "seq2seq", REPO)
    assert tags["dvc_experiment"] == "fuzzy-lamp" and tags["dvc_baseline_rev"] == "a" * 40
    assert tags["dvc_stage"] == "train@translation"
    changed = tags["params_changed"].split("; ")  # the run's own params only: no other task's keys
    assert "translation.train.max_epochs: 6 -> 2" in changed and not [c for c in changed if c.startswith("digits.")]
    committed = parse_params(yaml.safe_load(subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO,
                                                           capture_output=True, text=True, check=True).stdout))
    same = tracking.run_tags(committed, "translation", "seq2seq", REPO)
    assert same["params_differ_from_commit"] == "false" and "params_changed" not in same
    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    assert tracking.dvc_experiment() == {} and "dvc_experiment" not in tracking.run_tags(committed, "gesture",
                                                                                         "many_to_one", REPO)


@pytest.mark.parametrize("task", TASKS)
def test_a_run_logs_only_its_tasks_params(store, task):
    params = client(store).get_run(info(store.models, task)["mlflow_run_id"]).data.params
    section = store.params.task(task).model_dump(mode="json")
    every = {f"{task}.{group}.{k}" for group, values in section.items() if isinstance(values, dict) for k in values}
    every.add(f"{task}.topology")  # and the topology, data.source among the data
    unused = {"digits": {"model.embedding_dim", "model.attention", "model.frame_stride", "model.bidirectional",
                         "train.block_size"},
              "translation": {"model.frame_stride", "train.block_size", "train.augment_shift"},
              "charlm": {"model.attention", "model.frame_stride", "model.bidirectional", "train.augment_shift"}}[task]
    expected = {"seed"} | {f"trainer.{k}" for k in store.params.trainer.model_dump()}
    expected |= every - {f"{task}.{k}" for k in unused}
    assert set(params) == expected
    assert not [k for k in params if k.split(".")[0] in set(TASKS) - {task}]  # no other task's section


def _first_batch(dm, split="train"):
    dm.setup("fit")
    return next(iter(dm.loader(split, batch_size=8)))


@pytest.mark.parametrize("task", TASKS)
def test_settings_a_task_does_not_log_change_nothing_in_it(store, task):
    """What task_params leaves out really is unused: changing it gives the same data, weights and loss."""
    from pipeline.datasets.datamodule import PreparedDataModule
    from pipeline.topologies import OPTIONAL_SETTINGS

    spec, cfg = get_task(task), store.params.task(task)
    other = {"model.embedding_dim": 5, "model.attention": not cfg.model.attention, "model.frame_stride": 3,
             "model.bidirectional": not cfg.model.bidirectional, "train.block_size": 17, "train.augment_shift": 4}
    assert set(other) == OPTIONAL_SETTINGS

    def build(changes: dict):
        sections = {"model": cfg.model.model_dump(), "train": cfg.train.model_dump()}
        for key, value in changes.items():
            group, name = key.split(".")
            sections[group][name] = value
        dm = PreparedDataModule(store.data / task, 8, store.params.seed, sections["train"]["block_size"])
        batch = _first_batch(dm)
        torch.manual_seed(0)
        model = spec.model_class(vocab=dm.vocab, dims=dm.dims(), model=sections["model"], train=sections["train"])
        torch.manual_seed(1)
        with torch.no_grad():
            loss = model.loss_terms(batch)[0]  # in training mode: dropout and augmentation on
        return batch, model.state_dict(), loss

    batch, weights, loss = build({})
    for key in OPTIONAL_SETTINGS - set(spec.uses):
        batch2, weights2, loss2 = build({key: other[key]})
        assert batch2.keys() == batch.keys() and all(torch.equal(batch[k], batch2[k]) for k in batch), key
        assert weights2.keys() == weights.keys(), key
        assert all(torch.equal(weights[k], weights2[k]) for k in weights), key
        assert torch.equal(loss, loss2), key
    for key in spec.uses:  # and what it logs does change something (else it would not be its setting)
        batch2, weights2, loss2 = build({key: other[key]})
        differs = batch2.keys() != batch.keys() or any(batch[k].shape != batch2[k].shape or not torch.equal(
            batch[k], batch2[k]) for k in batch) or weights2.keys() != weights.keys() or any(
            weights[k].shape != weights2[k].shape for k in weights) or not torch.equal(loss, loss2)
        assert differs, key


@pytest.mark.parametrize("task", TASKS)
def test_run_duration_is_the_training(store, registered, task):
    """The run ends when training ends; evaluation and registration land in it without reopening it."""
    trained, evaluation_began = store.trained[task]
    run = client(store).get_run(info(store.models, task)["mlflow_run_id"])
    assert trained.status == "FINISHED" and trained.end_time <= evaluation_began
    assert (run.info.status, run.info.start_time, run.info.end_time) == ("FINISHED", trained.start_time,
                                                                         trained.end_time)
    evaluated = client(store).get_metric_history(run.info.run_id, f"{get_task(task).eval_split}_long_memory_units")
    assert evaluated and min(m.timestamp for m in evaluated) >= trained.end_time
    version = client(store).get_model_version(task, "1")  # registered from this run, logged into it
    assert version.run_id == run.info.run_id
    (output,) = run.outputs.model_outputs
    logged = client(store).get_logged_model(output.model_id)
    assert logged.source_run_id == run.info.run_id and version.source == f"models:/{output.model_id}"


@pytest.mark.parametrize("task", TASKS)
def test_the_prepared_data_is_the_runs_input_dataset(store, task):
    run = client(store).get_run(info(store.models, task)["mlflow_run_id"])
    (dataset_input,) = run.inputs.dataset_inputs
    dataset, manifest = dataset_input.dataset, json.loads((store.data / task / "manifest.json").read_text())
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "training"}
    assert dataset.name == task
    assert dataset.digest == "sha256:" + manifest["content_sha256"][:28]  # prepared outside DVC: the content hash
    assert dataset.source_type == "code"
    source = json.loads(dataset.source)["tags"]
    assert source["package"] == f"{manifest['source']['package']} {manifest['source']['version']}"
    assert source["prepared"] == (store.data / task).as_posix()
    assert json.loads(source["counts"]) == manifest["counts"]
    profile = json.loads(dataset.profile)  # the train split's arrays, not the data itself
    train_count = manifest["counts"]["train"]
    assert {shape[0] for shape in profile["features_shape"].values()} == {train_count}


def test_under_dvc_the_digest_is_the_dvc_hash(store, tmp_path, monkeypatch):
    folder = tmp_path / "data" / "prepared" / "digits"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"content_sha256": "c" * 64}))
    lock = {"schema": "2.0", "stages": {"prepare@digits": {"cmd": "python -m pipeline prepare digits", "outs": [
        {"path": "data/prepared/digits", "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    monkeypatch.chdir(tmp_path)
    relative = Path("data/prepared/digits")
    assert tracking.prepared_digest(relative) == "sha256:" + "c" * 28  # not under DVC: the lock may be stale
    monkeypatch.setenv("DVC_STAGE", "train@digits")
    assert tracking.prepared_digest(relative) == "0123456789abcdef0123456789abcdef.dir"
    other = tmp_path / "data" / "prepared" / "gesture"  # no entry in dvc.lock
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"content_sha256": "d" * 64}))
    assert tracking.prepared_digest(Path("data/prepared/gesture")) == "sha256:" + "d" * 28


# --- the registry and the champion alias ----------------------------------------------------------------


def test_is_better_is_at_least_as_good():
    assert is_better(0.5, None, True) and is_better(9.0, None, False)
    assert is_better(0.5, 0.5, True) and is_better(0.5, 0.5, False)  # a tie moves the alias
    assert is_better(0.6, 0.5, True) and not is_better(0.4, 0.5, True)
    assert is_better(0.4, 0.5, False) and not is_better(0.6, 0.5, False)


def retrain(store, task: str, name: str, lr: float, key_value: float) -> SimpleNamespace:
    """Another tracked run of `task` (a new run id: another lr) evaluated, with its key metric written over."""
    from pipeline.evaluate import evaluate
    from pipeline.train import train

    params = parse_params(tiny_raw_params(store.tmp, **{task: lr}))
    out = SimpleNamespace(models=store.tmp / f"models_{name}", metrics=store.tmp / f"metrics_{name}")
    train(task, params, data_root=store.data, models_root=out.models, ckpt_root=store.tmp / f"ckpt_{name}",
          root=REPO)
    evaluate(task, params, data_root=store.data, models_root=out.models, metrics_root=out.metrics,
             plots_root=store.tmp / f"plots_{name}", samples_root=store.tmp / f"samples_{name}",
             figures_root=store.tmp / f"figures_{name}", track=False)
    path = out.metrics / f"{task}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), get_task(task).key_metric: key_value}))
    out.run_id = info(out.models, task)["mlflow_run_id"]
    return out


def test_registration_moves_the_champion_only_when_not_worse(store, registered):
    c, run_id = client(store), info(store.models, "digits")["mlflow_run_id"]
    first = registered["digits"]
    assert first["version"] == 1 and first["new_version"] and first["alias_moved"] and first["why"] == "first version"
    v1 = c.get_model_version("digits", "1")
    accuracy = json.loads((store.metrics / "digits.json").read_text())["accuracy"]
    assert v1.run_id == run_id and v1.tags["metric.accuracy"] == str(accuracy)
    assert v1.tags["key_metric"] == "accuracy" and v1.tags["higher_is_better"] == "True"
    assert v1.tags["task"] == "digits" and v1.tags["fingerprint"] == info(store.models, "digits")["fingerprint"]
    assert str(champion(store, "digits").version) == "1"
    run_name = c.get_run(run_id).info.run_name
    assert v1.description == (f"digits (one_to_one) from run {run_name} ({run_id}): accuracy {accuracy:.4f} on "
                              "the test split (higher is better). At registration it became `champion` "
                              "(first version).")
    model = c.get_registered_model("digits").description
    assert model.startswith("Task `digits`: a one_to_one model on GateLSTM, trained on ")
    assert "the best accuracy on the test split (higher is better)" in model

    again = register(store, "digits")  # the same run: no second version
    assert (again["version"], again["new_version"], again["alias_moved"]) == (1, False, False)
    assert again["why"] == "already champion" and versions(store, "digits") == ["1"]

    worse = retrain(store, "digits", "worse", lr=0.01, key_value=accuracy - 0.25)
    assert worse.run_id != run_id
    receipt = register(store, "digits", worse.models, worse.metrics)
    assert receipt["version"] == 2 and receipt["new_version"] and not receipt["alias_moved"]
    assert receipt["champion_version"] == 1 and receipt["value"] == pytest.approx(accuracy - 0.25)
    assert receipt["why"] == f"accuracy {accuracy - 0.25:.4f} is worse than champion v1's {accuracy:.4f}"
    assert str(champion(store, "digits").version) == "1" and versions(store, "digits") == ["1", "2"]
    assert c.get_model_version("digits", "2").tags["metric.accuracy"] == str(accuracy - 0.25)
    assert c.get_model_version("digits", "2").description.endswith(
        f"At registration it left `champion` where it was (accuracy {accuracy - 0.25:.4f} is worse than champion "
        f"v1's {accuracy:.4f}).")

    better = retrain(store, "digits", "better", lr=0.02, key_value=accuracy + 0.25)
    receipt = register(store, "digits", better.models, better.metrics)
    assert receipt["version"] == 3 and receipt["alias_moved"] and receipt["champion_version"] == 3
    assert receipt["why"].startswith(f"accuracy {accuracy + 0.25:.4f} >= champion v1's")
    assert str(champion(store, "digits").version) == "3" and champion(store, "digits").run_id == better.run_id
    assert f"became `champion` (accuracy {accuracy + 0.25:.4f} >= champion v1's" in c.get_model_version(
        "digits", "3").description
    assert "(first version)" in c.get_model_version("digits", "1").description  # its own reason stays

    again = register(store, "digits", worse.models, worse.metrics)  # the worse run again: still v2, no move
    assert (again["version"], again["new_version"], again["alias_moved"]) == (2, False, False)
    assert str(champion(store, "digits").version) == "3" and versions(store, "digits") == ["1", "2", "3"]


def fail(*args, **kwargs):
    raise RuntimeError("registry write failed (simulated)")


@pytest.mark.parametrize("method", ["set_registered_model_alias", "set_model_version_tag"])
def test_failed_registration_leaves_no_version_and_the_alias(store, registered, method, monkeypatch):
    from mlflow.tracking import MlflowClient

    task = "translation"  # digits' versions are the test above's
    before, holder = versions(store, task), champion(store, task)
    best = float(holder.tags["metric.exact_match"])
    run = retrain(store, task, f"failing_{method}", lr=0.01, key_value=best + 1.0)  # would become champion
    with monkeypatch.context() as mp:
        mp.setattr(MlflowClient, method, fail)
        with pytest.raises(RuntimeError, match="simulated"):
            register(store, task, run.models, run.metrics)
    assert versions(store, task) == before
    assert str(champion(store, task).version) == str(holder.version)
    receipt = register(store, task, run.models, run.metrics)  # once the store works, it registers
    assert receipt["new_version"] and receipt["alias_moved"] and str(receipt["version"]) not in before
    assert champion(store, task).run_id == run.run_id


def test_register_all_checks_every_task_first_and_writes_receipts(store, registered, tmp_path):
    before = {t: (versions(store, t), str(champion(store, t).version)) for t in TASKS}
    roots = {"registry_root": tmp_path / "registry", "models_root": store.models, "metrics_root": store.metrics,
             "root": REPO}
    with_melody = parse_params(tiny_raw_params(store.tmp) | {"tasks": [*TASKS, "melody"]})
    with pytest.raises(PipelineError, match="no metrics for melody"):  # before registering anything
        register_all(with_melody, **roots)
    assert list(tmp_path.iterdir()) == []
    line = register_all(store.params, **roots)
    assert line.startswith("registered: digits v1") and "charlm v1 (champion)" in line
    assert list(tmp_path.iterdir()) == [tmp_path / "registry"]  # no temporary folder left
    receipts = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "registry").iterdir()}
    assert set(receipts) == set(TASKS)
    for task, receipt in receipts.items():  # the fixture's runs again: their versions, no new one
        assert receipt["version"] == 1 and not receipt["new_version"]
        assert receipt["key_metric"] == get_task(task).key_metric
        assert receipt["run_id"] == info(store.models, task)["mlflow_run_id"]
    assert {t: (versions(store, t), str(champion(store, t).version)) for t in TASKS} == before


# --- pyfunc round trips from the registry ---------------------------------------------------------------


def champion_model(store, task: str):
    """The pyfunc model of models:/<task>@champion and the same model rebuilt in memory from its folder."""
    import mlflow

    with tracking.mlflow_uri(store.uri):
        loaded = mlflow.pyfunc.load_model(f"models:/{task}@{ALIAS}")
    run_id = champion(store, task).run_id
    (folder,) = [p.parent for p in store.tmp.glob(f"models*/{task}/config.json")
                 if json.loads(p.read_text())["mlflow_run_id"] == run_id]
    return loaded, load_trained(folder)[0]


def test_pyfunc_digits_labels_are_the_argmax(store, registered):
    loaded, model = champion_model(store, "digits")
    x = np.load(store.data / "digits" / "test.npz")["x"][:20]  # (N, 28, 28) float32 in [0, 1]
    out = loaded.predict(x)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)), -1)
    labels = model.vocab["labels"]
    assert out["label"].tolist() == [labels[i] for i in probs.argmax(-1).tolist()]
    assert np.allclose(out["probability"], probs.max(-1).values.numpy(), atol=1e-6)


def test_pyfunc_translation_is_greedy_decoding(store, registered):
    from pipeline.datasets.translation import detokenize, encode_source

    loaded, model = champion_model(store, "translation")
    texts = ["forty-two", "one hundred and seven", "three", "two hundred"]
    out = loaded.predict(pd.DataFrame({"text": texts}))
    ids = [encode_source(t, model.vocab) for t in texts]
    src = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for row, seq in zip(src, ids):
        row[: len(seq)] = torch.tensor(seq)
    words = model.vocab["tgt_tokens"]
    expected = [detokenize([words[i] for i in o]) for o in model.greedy(src, torch.tensor([len(s) for s in ids]))]
    assert out["text"].tolist() == texts and out["translation"].tolist() == expected


def test_pyfunc_charlm_samples_like_the_model(store, registered):
    from pipeline import serve

    loaded, model = champion_model(store, "charlm")
    greedy = loaded.predict(pd.DataFrame({"prime": ["The king", "ROMEO:"], "length": [50, 30],
                                          "temperature": [0.0, 0.0]}))
    assert greedy["text"].tolist() == [model.sample("The king", 50, temperature=0),
                                       model.sample("ROMEO:", 30, temperature=0)]
    # top_k and seed reach the model (not dropped by the signature): a seeded draw is reproducible
    drawn = loaded.predict(pd.DataFrame({"prime": ["The "], "length": [40], "temperature": [1.0], "top_k": [5],
                                         "seed": [11]}))
    assert drawn["text"][0] == model.sample("The ", 40, 1.0, 5, seed=11)
    only_prime = loaded.predict(pd.DataFrame({"prime": ["ROMEO:"]}))["text"][0]  # defaults: 200 characters
    assert only_prime.startswith("ROMEO:") and len(only_prime) == len("ROMEO:") + 200
    assert "ROMEO:" in serve.predict(store.params, "charlm", ["ROMEO:"], None)


def test_cli_sample_prints_the_champions_text(store, registered, tmp_path):
    _, model = champion_model(store, "charlm")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params(store.tmp)))
    env = {k: v for k, v in os.environ.items() if k != ENV} | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline", "sample", "--prime", "The king", "--length", "50", "--temperature", "0"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("The king")
    assert done.stdout == model.sample("The king", 50, temperature=0) + "\n"

    bad = tiny_raw_params(store.tmp) | {"tracking": {"uri": "http://127.0.0.1:9"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: MLflow tracking store http://127.0.0.1:9") and done.stderr.count("\n") == 1


# --- an unusable store, and the tracking server --------------------------------------------------------


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9", "sqlite:////proc/nope/mlflow.db"])
def test_unusable_store_fails_fast_in_one_line(uri):
    params = parse_params({"tracking": {"uri": uri}})
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    start = time.monotonic()
    with pytest.raises(PipelineError) as err:
        tracking.experiment_id(params)
    assert time.monotonic() - start < 20
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"MLflow tracking store {uri} is unreachable or unwritable")
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == retries  # the fail-fast settings are put back


@pytest.mark.parametrize("kind", ["dead server", "missing file", "another store"])
def test_evaluation_checks_the_store_and_run_before_writing_anything(store, tmp_path, monkeypatch, kind):
    """`python -m pipeline evaluate` logs into the model's training run: a store that is down, absent or without
    that run stops it in seconds, in one line, before a metric, plot, page or probe file is written (and an
    absent sqlite file is not created)."""
    from pipeline.evaluate import stage

    if kind == "another store":
        other = f"sqlite:///{tmp_path}/other.db"
        tracking.experiment_id(parse_params({"tracking": {"uri": other}}))  # a real store, without the run
    uri = {"dead server": "http://127.0.0.1:9", "missing file": f"sqlite:///{tmp_path}/absent/mlflow.db",
           "another store": f"sqlite:///{tmp_path}/other.db"}[kind]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(store.data)  # the stage's default roots, relative to the cwd
    (tmp_path / "models").symlink_to(store.models)
    run_id = info(store.models, "digits")["mlflow_run_id"]
    start = time.monotonic()
    with pytest.raises(PipelineError) as err:
        stage("digits", store.params)
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"MLflow tracking store {uri}") and run_id in message
    written = [p.name for p in tmp_path.iterdir() if p.name not in ("data", "models", "other.db")]
    assert written == [], written  # no metrics/, plots/, figures/, samples/, explorer/, probes/
    assert not (tmp_path / "absent").exists()


def test_env_uri_wins_but_mlflow_does_not_leak_one(store, registered, tmp_path, monkeypatch):
    import mlflow

    from pipeline import serve

    other = parse_params({"tracking": {"uri": f"sqlite:///{tmp_path}/other.db"}})
    assert tracking.tracking_uri(store.params) == store.uri
    monkeypatch.setenv(ENV, "sqlite:////elsewhere.db")  # the user's variable wins over params
    assert tracking.tracking_uri(store.params) == "sqlite:////elsewhere.db"
    monkeypatch.delenv(ENV)
    # mlflow.set_tracking_uri (ours, Lightning's) exports the URI to os.environ whenever it changes it; our
    # calls with the store's params must not turn that into an override for calls with other params
    for use_store in (lambda: serve.load(store.params, f"models:/charlm@{ALIAS}"),
                      lambda: tracking.make_logger(store.params, "charlm", {"purpose": "leak test"}).finalize()):
        mlflow.set_tracking_uri(tracking.tracking_uri(other))
        monkeypatch.delenv(ENV)
        use_store()
        assert ENV not in os.environ
        assert tracking.tracking_uri(other) == f"sqlite:///{tmp_path}/other.db"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 5) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read().decode()


def test_mlflow_server_serves_the_runs_and_the_ui(store, tmp_path):
    port, run_id = free_port(), info(store.models, "charlm")["mlflow_run_id"]
    base = f"http://127.0.0.1:{port}"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", store.uri, "--default-artifact-root", str(store.tmp / "mlruns")]
    env = {k: v for k, v in os.environ.items() if k != ENV}
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if http(f"{base}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server not ready in 90 s"
            time.sleep(0.5)
        experiment = tracking.experiment_id(store.params)
        status, text = http(f"{base}/api/2.0/mlflow/runs/search",
                            {"experiment_ids": [experiment], "filter": f"attributes.run_id = '{run_id}'"})
        runs = json.loads(text)["runs"]
        assert status == 200 and [r["info"]["run_id"] for r in runs] == [run_id]
        assert {"key": "task", "value": "charlm"} in runs[0]["data"]["tags"]
        metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
        loss = json.loads((store.metrics / "charlm.json").read_text())["loss"]
        assert "test_loss" not in metrics  # charlm is evaluated on its val split
        assert metrics["val_bits_per_char"] == pytest.approx(loss / math.log(2), abs=1e-5)
        status, page = http(f"{base}/")
        assert status == 200 and "<html" in page.lower()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
