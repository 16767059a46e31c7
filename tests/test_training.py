"""The train stage end to end on a tiny prepared task written here (CPU, seconds per run):
bitwise repeatability, resuming an interrupted run, fingerprints, the global batch split over
devices, 1 vs 2 CPU DDP processes, and the NaN guard through train() and through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.config import Params, PipelineError, TrainerConfig, task_section
from pipeline.datasets.prepared import Prepared, save_prepared
from pipeline.models.base import NonFiniteLossError
from pipeline.train import train

REPO = Path(__file__).resolve().parents[1]
TASK = "digits"
N_TRAIN, N_VAL, BATCH, EPOCHS = 48, 17, 8, 3  # 17: the last validation batch is short and odd
STEPS = EPOCHS * (N_TRAIN // BATCH)
DDP_EPOCHS = 4
DDP_STEPS = DDP_EPOCHS * (N_TRAIN // BATCH)


def digits_like(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random 28x28 "images" whose label says which half and which side is brighter: learnable."""
    x = rng.random((n, 28, 28), dtype=np.float32)
    y = (x[:, :14].mean((1, 2)) > x[:, 14:].mean((1, 2))).astype(np.int64)
    y += 2 * (x[:, :, :14].mean((1, 2)) > x[:, :, 14:].mean((1, 2)))
    return {"x": x, "y": y}


def write_task(data_root: Path, nan_at: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    splits = {"train": digits_like(N_TRAIN, rng), "val": digits_like(N_VAL, rng), "test": digits_like(8, rng)}
    if nan_at is not None:
        splits["train"]["x"][nan_at, 3, 3] = np.nan
    vocab = {"labels": [str(d) for d in range(10)]}
    save_prepared(Prepared(splits, vocab, {"package": "tests"}), data_root / TASK)
    return data_root


def make_params(*, lr: float = 0.01, dropout: float = 0.3, epochs: int = EPOCHS, batch: int = BATCH,
                devices: int = 1, strategy: str = "auto", layers: int = 1, shift: int = 0) -> Params:
    return Params(seed=11, tasks=[TASK], trainer=TrainerConfig(accelerator="cpu", devices=devices, strategy=strategy),
                  digits=task_section("digits", {
                      "model": {"hidden_size": 12, "dropout": dropout, "num_layers": layers},
                      "train": {"batch_size": batch, "max_epochs": epochs, "lr": lr, "augment_shift": shift}}))


def run(data_root: Path, out: Path, params: Params, callbacks=()) -> str:
    return train(TASK, params, data_root=data_root, models_root=out / "models", ckpt_root=out / "checkpoints",
                 track=False, callbacks=callbacks)


def result(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = out / "models" / TASK
    return load_file(folder / "weights.safetensors"), json.loads((folder / "config.json").read_text())


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class LossLog(L.Callback):
    """Per step: [global step, logged train_loss, samples in this rank's batch, sum of its x].

    Every rank appends to its own file: files survive ddp_spawn, in-memory state does not."""

    def __init__(self, path: Path):
        self.path = str(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = float(trainer.callback_metrics["train_loss"])
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps([trainer.global_step, loss, len(batch["y"]), float(batch["x"].double().sum())]) + "\n")


def read_log(path: Path, rank: int = 0) -> list[list]:
    return [json.loads(line) for line in Path(f"{path}.rank{rank}").read_text().splitlines()]


class Interrupted(Exception):
    pass


class Interrupt(L.Callback):
    """Raise in hook `where` of epoch k (0-based), as a kill would stop the run there."""

    def __init__(self, where: str, k: int):
        self.where, self.k = where, k

    def on_train_epoch_start(self, trainer, pl_module):
        if self.where == "on_train_epoch_start" and trainer.current_epoch == self.k:
            raise Interrupted(f"stopped at the start of epoch {self.k}")

    def on_train_epoch_end(self, trainer, pl_module):
        # runs before ModelCheckpoint's own on_train_epoch_end (a monitoring callback): epoch k is trained
        # but not saved, so the rerun resumes from epoch k - 1's checkpoint and trains epoch k again
        if self.where == "on_train_epoch_end" and trainer.current_epoch == self.k:
            raise Interrupted(f"stopped at the end of epoch {self.k}")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory) -> Path:
    """One uninterrupted run with dropout, the reference the others must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    summary = run(data_root, out, make_params(), callbacks=[LossLog(out / "loss")])
    assert f"for {EPOCHS} epochs, {STEPS} steps on 1 device(s)" in summary
    return out


# --- reproducibility and resuming ------------------------------------------------------------


def test_two_runs_are_bitwise_identical(data_root, reference, tmp_path):
    run(data_root, tmp_path, make_params(), callbacks=[LossLog(tmp_path / "loss")])
    (w1, c1), (w2, c2) = result(reference), result(tmp_path)
    assert_same_weights(w1, w2)
    assert c1["best_val_loss"] == c2["best_val_loss"] is not None
    assert (c1["epochs"], c1["global_step"]) == (c2["epochs"], c2["global_step"]) == (EPOCHS, STEPS)
    first, second = read_log(reference / "loss"), read_log(tmp_path / "loss")
    assert len(first) == STEPS and first == second
    assert first[-1][1] < first[0][1]  # and it learned something
    per_epoch = N_TRAIN // BATCH
    assert [s[3] for s in first[:per_epoch]] != [s[3] for s in first[per_epoch : 2 * per_epoch]]  # reshuffled
    # the weights written are the best checkpoint's
    ckpt = torch.load(reference / "models" / TASK / "best.ckpt", map_location="cpu", weights_only=True)
    assert_same_weights(ckpt["state_dict"], w1)


@pytest.mark.parametrize("where", ["on_train_epoch_end", "on_train_epoch_start"])
def test_interrupted_run_resumes_and_ends_where_an_uninterrupted_one_ends(data_root, reference, tmp_path, capsys,
                                                                          where):
    with pytest.raises(Interrupted):
        run(data_root, tmp_path, make_params(), callbacks=[Interrupt(where, 1), LossLog(tmp_path / "first")])
    last = tmp_path / "checkpoints" / TASK / "last.ckpt"
    saved_step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert saved_step == STEPS // EPOCHS  # the end of epoch 0
    assert not (tmp_path / "models" / TASK).exists()  # models/<task>/ appears only after success
    ref_log = read_log(reference / "loss")
    first = read_log(tmp_path / "first")
    assert first == ref_log[: len(first)] and len(first) >= saved_step
    capsys.readouterr()

    run(data_root, tmp_path, make_params(), callbacks=[LossLog(tmp_path / "second")])
    assert f"resuming from {last}" in capsys.readouterr().out
    (w_ref, c_ref), (w, c) = result(reference), result(tmp_path)
    assert_same_weights(w, w_ref)
    assert c["best_val_loss"] == c_ref["best_val_loss"]
    assert (c["epochs"], c["global_step"]) == (EPOCHS, STEPS)
    # the rerun trained only what the checkpoint lacked, on the same batches with the same dropout masks
    assert read_log(tmp_path / "second") == ref_log[saved_step:]


def test_changed_params_start_afresh(data_root, tmp_path, capsys):
    with pytest.raises(Interrupted):
        run(data_root, tmp_path / "a", make_params(), callbacks=[Interrupt("on_train_epoch_start", 1)])
    assert (tmp_path / "a" / "checkpoints" / TASK / "last.ckpt").exists()
    capsys.readouterr()
    other = make_params(lr=0.003)
    run(data_root, tmp_path / "a", other, callbacks=[LossLog(tmp_path / "a.loss")])
    assert "resuming" not in capsys.readouterr().out
    run(data_root, tmp_path / "b", other, callbacks=[LossLog(tmp_path / "b.loss")])  # a fresh run elsewhere
    assert_same_weights(result(tmp_path / "a")[0], result(tmp_path / "b")[0])
    assert read_log(tmp_path / "a.loss") == read_log(tmp_path / "b.loss")
    assert len(read_log(tmp_path / "a.loss")) == STEPS


# --- the global batch over devices -----------------------------------------------------------


def test_batch_size_must_divide_over_devices_before_anything_spawns(data_root, tmp_path, monkeypatch):
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    def no_spawn(*args, **kwargs):
        raise AssertionError("processes were spawned before the batch size was checked")

    monkeypatch.setattr(_MultiProcessingLauncher, "launch", no_spawn)
    with pytest.raises(PipelineError) as err:
        run(data_root, tmp_path, make_params(batch=5, devices=2, strategy="ddp_spawn"))
    message = str(err.value)
    assert "\n" not in message and "batch_size 5" in message and "2 devices" in message
    assert not (tmp_path / "models").exists()


def test_one_and_two_cpu_processes_give_the_same_loss_curve(data_root, tmp_path, monkeypatch):
    """ddp_spawn, not ddp: ddp re-launches pytest itself as rank 1. Dropout (head and between two
    layers) and shift augmentation on: their draws are per sample, so they match too."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # spawned processes side by side on 2 cores (this one: one_thread)
    logs = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        out = tmp_path / f"p{devices}"
        params = make_params(dropout=0.3, layers=2, shift=2, epochs=DDP_EPOCHS, devices=devices, strategy=strategy)
        summary = run(data_root, out, params, callbacks=[LossLog(out / "loss")])
        assert f"{DDP_STEPS} steps on {devices} device(s)" in summary
        logs[devices] = [read_log(out / "loss", rank) for rank in range(devices)]
    (alone,), (rank0, rank1) = logs[1], logs[2]
    assert len(alone) == len(rank0) == len(rank1) == DDP_STEPS >= 20
    for step, half0, half1 in zip(alone, rank0, rank1):
        # each rank holds its half of the same global batch (step, loss, samples, sum of x)
        assert step[2] == BATCH and half0[2] == half1[2] == BATCH // 2
        assert half0[3] + half1[3] == pytest.approx(step[3], rel=1e-9)
        assert half0[1] == half1[1]  # the logged loss is the global batch's, on every rank
    losses1 = np.array([s[1] for s in alone])
    losses2 = np.array([s[1] for s in rank0])
    worst = float(np.max(np.abs(losses2 - losses1) / np.abs(losses1)))
    print(f"1 vs 2 processes: max relative train_loss difference {worst:.2e} over {len(losses1)} steps")
    assert worst < 1e-4
    (w1, c1), (w2, c2) = result(tmp_path / "p1"), result(tmp_path / "p2")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-4, rtol=1e-3)
    # the config of a spawned run is complete, and the validation loss is the same global mean
    assert (c2["epochs"], c2["global_step"], c2["world_size"]) == (DDP_EPOCHS, DDP_STEPS, 2)
    assert c2["best_val_loss"] == pytest.approx(c1["best_val_loss"], rel=1e-4)


# --- the NaN guard ---------------------------------------------------------------------------


def test_nan_loss_stops_training_and_writes_no_model(tmp_path):
    data = write_task(tmp_path / "data", nan_at=5)
    with pytest.raises(NonFiniteLossError) as err:
        run(data, tmp_path, make_params(dropout=0.0))
    message = str(err.value)
    assert "\n" not in message and "train_loss is nan" in message
    assert not (tmp_path / "models" / TASK).exists()
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())  # no temporary folder


def test_nan_loss_through_the_cli_is_one_error_line(tmp_path):
    write_task(tmp_path / "data" / "prepared", nan_at=5)
    raw = make_params(dropout=0.0, epochs=1).model_dump(mode="json", exclude_unset=True)  # only what was set
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", TASK], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "train_loss is nan" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "models" / TASK).exists()


# --- MLflow under DDP ----------------------------------------------------------------------------


def test_two_process_training_makes_one_mlflow_run(data_root, tmp_path, monkeypatch):
    """Only global rank 0 talks to MLflow: a 2-process run is one run, with every step's train_loss once."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrackingConfig

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = make_params(dropout=0.0, epochs=2, devices=2, strategy="ddp_spawn").model_copy(
        update={"tracking": TrackingConfig(uri=uri, artifact_location=str(tmp_path / "mlruns"))})
    out = tmp_path / "run"
    train(TASK, params, data_root=data_root, models_root=out / "models", ckpt_root=out / "checkpoints",
          track=True, root=tmp_path)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    (run,) = runs
    config = json.loads((out / "models" / TASK / "config.json").read_text())
    assert config["mlflow_run_id"] == run.info.run_id and config["world_size"] == 2
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(config["global_step"]))  # each step once: rank 1 logged nothing
    assert run.data.tags["world_size"] == "2"


# --- checkpoints and run status ------------------------------------------------------------------


def test_last_checkpoint_is_the_last_epoch_and_a_finished_training_is_not_retrained(data_root, reference, tmp_path,
                                                                                    capsys):
    import shutil

    last = torch.load(reference / "checkpoints" / TASK / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(reference / "checkpoints" / TASK / "best.ckpt", map_location="cpu", weights_only=True)
    weights, config = result(reference)
    assert (last["epoch"] + 1, last["global_step"]) == (EPOCHS, STEPS) == (config["epochs"], config["global_step"])
    assert (config["best_epoch"], config["best_global_step"]) == (best["epoch"] + 1, best["global_step"])
    assert config["best_val_loss"] == pytest.approx(float(best["callbacks"][next(
        k for k in best["callbacks"] if "val_loss" in k)]["best_model_score"]))
    # a rerun with the same fingerprint (models/<task> deleted, as `dvc repro` does) trains nothing
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    capsys.readouterr()
    summary = run(data_root, tmp_path, make_params(), callbacks=[LossLog(tmp_path / "loss")])
    assert "already trained" in summary and f"for {EPOCHS} epochs, {STEPS} steps" in summary
    assert not Path(f"{tmp_path / 'loss'}.rank0").exists()  # not one step
    again_weights, again = result(tmp_path)
    assert_same_weights(again_weights, weights)
    assert again == config


def test_mlflow_run_is_failed_then_resumed_once_per_step(data_root, tmp_path, monkeypatch):
    """A failed training marks its run FAILED; the resume sets it RUNNING, then FINISHED, and the steps
    it redoes (epoch 1 was logged, not checkpointed) are not logged twice."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrackingConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = make_params().model_copy(
        update={"tracking": TrackingConfig(uri=uri, artifact_location=str(tmp_path / "mlruns"))})
    out = tmp_path / "run"
    kwargs = dict(data_root=data_root, models_root=out / "models", ckpt_root=out / "checkpoints", track=True,
                  root=tmp_path)
    with pytest.raises(Interrupted):
        train(TASK, params, callbacks=[Interrupt("on_train_epoch_end", 1)], **kwargs)
    client = MlflowClient(uri)
    (failed,) = client.search_runs([client.get_experiment_by_name(params.tracking.experiment).experiment_id])
    assert failed.info.status == "FAILED"
    first = [m.step for m in client.get_metric_history(failed.info.run_id, "train_loss")]
    assert len(first) > STEPS // EPOCHS  # epoch 1's steps were logged before the failure

    statuses = []

    class Status(L.Callback):
        def on_train_start(self, trainer, pl_module):
            statuses.append(client.get_run(failed.info.run_id).info.status)

    train(TASK, params, callbacks=[Status()], **kwargs)
    run = client.get_run(failed.info.run_id)
    assert statuses == ["RUNNING"] and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(STEPS))  # every step once
    val_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert len(val_steps) == len(set(val_steps)) == EPOCHS
