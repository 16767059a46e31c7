"""Stage `train`: data/prepared/<task>/ -> models/<task>/ (weights, config, checkpoints, run id).

    python -m pipeline train <task>

Launch mistakes (nodes without a launcher, devices x nodes != the launcher's world size, a split
too small for every rank) are refused first, in one line, before any checkpoint, model or MLflow
side effect. Checkpoints live in checkpoints/<task>/ (a DVC `persist` output) next to a fingerprint
of everything that shapes the run: `best.ckpt` (lowest val_loss) and `last.ckpt` (rewritten after
every epoch). A rerun with the same fingerprint resumes from `last.ckpt`, so a killed training
continues where it stopped and ends where an uninterrupted one ends; a finished one is not retrained
(models/<task>/ is rewritten from its checkpoints). models/<task>/ is written only after training
succeeded, in one rename. The MLflow run of a failed training is marked FAILED, of a killed one
(SIGTERM, SIGINT) KILLED; its resume sets it RUNNING again and logs no step twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import Params, PipelineError, first_line
from pipeline.tasks import get_task

DATA_ROOT, MODELS_ROOT, CKPT_ROOT = Path("data/prepared"), Path("models"), Path("checkpoints")


def fingerprint(task: str, params: Params, data_dir: Path) -> str:
    from pipeline.datasets.prepared import load_manifest

    what = {"seed": params.seed, "trainer": params.trainer.model_dump(),
            "task": params.task(task).model_dump(mode="json"), "data": load_manifest(data_dir)["content_sha256"]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _resume_state(ckpt_dir: Path, stamp: str, zero: bool, store: str | None) -> tuple[Path | None, dict]:
    """(last checkpoint, saved resume.json) to resume from; rank 0 clears the folder when anything changed:
    the fingerprint, or the MLflow store (`store`: its URI, None untracked), which the saved run id belongs to."""
    meta = ckpt_dir / "resume.json"
    if meta.exists():
        saved = json.loads(meta.read_text())
        last = ckpt_dir / "last.ckpt"
        if saved.get("fingerprint") == stamp and saved.get("tracking_uri") == store and last.exists():
            if zero and not saved.get("finished"):
                print(f"resuming from {last}")
            return last, saved
    if zero:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    return None, {}


def _write_resume(ckpt_dir: Path, state: dict) -> None:
    """resume.json in one rename: other ranks read it while rank 0 writes it."""
    from pipeline.atomic import write_file_atomic

    write_file_atomic(ckpt_dir / "resume.json", json.dumps(state))


def _devices_count(devices) -> int | None:
    """How many devices trainer.devices asks for per node, when it says (None for "auto" or -1)."""
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, str):
        if "," in devices:
            return len([d for d in devices.split(",") if d.strip()])
        devices = int(devices) if devices.strip().lstrip("-").isdigit() else -1
    return devices if devices > 0 else None


def launcher_world() -> tuple[int | None, int | None]:
    """(world size, processes per node) the launcher made: torchrun, Lightning's own launcher and most
    others set WORLD_SIZE (and LOCAL_WORLD_SIZE); SLURM's srun sets SLURM_NTASKS (an interactive
    allocation without srun does not count, as Lightning decides). (None, None) without a launcher."""
    env = os.environ
    slurm = False
    if "SLURM_NTASKS" in env and "WORLD_SIZE" not in env:  # Lightning only then: this check runs before torch loads
        from lightning.fabric.plugins.environments import SLURMEnvironment

        slurm = SLURMEnvironment.detect()
    world = env.get("SLURM_NTASKS") if slurm else env.get("WORLD_SIZE")
    local = env.get("SLURM_NTASKS_PER_NODE") if slurm else env.get("LOCAL_WORLD_SIZE")
    as_int = lambda v: int(v) if v and v.isdigit() else None  # noqa: E731
    return as_int(world), as_int(local)


def check_launch(params: Params) -> None:
    """Refuse, in one line, a trainer section the processes at hand cannot run (instead of a hang at the
    rendezvous or a traceback on every rank). Ranks other than 0 exit with code 2 silently."""
    t = params.trainer
    world, local = launcher_world()
    per_node = _devices_count(t.devices)
    problem = None
    if world is None:
        if t.num_nodes > 1:
            problem = (f"trainer.num_nodes={t.num_nodes} needs a launcher that starts the processes on every node "
                       f"(torchrun --nnodes {t.num_nodes} ..., SLURM's srun); none found (no WORLD_SIZE set)")
    elif per_node is not None and per_node * t.num_nodes != world:
        problem = (f"trainer.devices x trainer.num_nodes = {per_node} x {t.num_nodes} = {per_node * t.num_nodes}, "
                   f"but the launcher started {world} processes (WORLD_SIZE={world}): make them agree")
    elif per_node is not None and local is not None and per_node != local:
        problem = (f"trainer.devices={per_node}, but the launcher started {local} processes on this node "
                   f"(LOCAL_WORLD_SIZE={local}): make them agree")
    if problem is not None:
        refuse(problem)


def refuse(problem: str) -> None:
    """A launch problem every rank finds: global rank 0 raises it (one `error:` line); the others exit with
    code 2 silently, a few seconds later, so that the launcher (torchrun stops every rank at the first
    failure) lets rank 0 say it first."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        time.sleep(3)
        raise SystemExit(2)
    raise PipelineError(problem)


def check_split(dm, task: str, batch_size: int, world: int) -> None:
    """Every rank needs at least one train and one val batch (else a hang or a 'zero length' traceback)."""
    for split, kwargs in (("train", {"shuffle": True, "drop_last": True}), ("val", {})):
        n = len(next(iter(dm.split(split).values())))
        empty = [r for r in range(world)
                 if len(dm.loader(split, rank=r, world_size=world, **kwargs).batch_sampler) == 0]
        if empty:
            refuse(f"{task}: the {split} split ({n} samples) gives {len(empty)} of {world} process(es) "
                   f"no batch (train.batch_size {batch_size}): use fewer devices or more data")
    if dm.is_stream:  # carried state (pipeline.datasets.streams): every stream needs a window
        for split in ("train", "val"):
            try:
                dm.stream_loader(split, world_size=world)
            except PipelineError as err:
                refuse(f"{task}: the {split} split: {err}")


def build_trainer(params: Params, task: str, ckpt_dir: Path, logger, extra_callbacks=()):
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = params.task(task).train
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min",
                                 save_top_k=1, enable_version_counter=False)
    # last.ckpt after every epoch, whatever val_loss did (save_last on the monitored callback rewrote it only
    # on improvement). After `checkpoint` in the list: last.ckpt then holds this epoch's best score.
    last = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    try:  # Lightning checks accelerator, devices and precision here: a bad value is one line, not a traceback
        trainer = L.Trainer(
            **params.trainer.model_dump(),
            max_epochs=cfg.max_epochs,
            gradient_clip_val=cfg.gradient_clip_val,
            limit_train_batches=cfg.limit_train_batches,
            deterministic=True,
            use_distributed_sampler=False,  # GlobalBatchSampler: the same global batches on any device count
            log_every_n_steps=1,  # train_loss at every step
            logger=logger if logger is not None else False,
            callbacks=[checkpoint, last, *extra_callbacks],
            default_root_dir=ckpt_dir,
            enable_model_summary=False,
        )
    except (MisconfigurationException, ValueError, TypeError) as err:
        raise PipelineError(f"trainer {params.trainer.model_dump()}: {first_line(err, 300)}") from None
    if cfg.batch_size % trainer.world_size:
        raise PipelineError(f"{task}.train.batch_size {cfg.batch_size} is not divisible by the "
                            f"{trainer.world_size} devices (trainer.devices x trainer.num_nodes)")
    return trainer, checkpoint


def write_model_dir(out_dir: Path, model, info: dict, ckpt_dir: Path) -> None:
    """models/<task>/: weights.safetensors + config.json (+ the checkpoints), in one rename."""
    from safetensors.torch import save_file

    from pipeline.atomic import atomic_dir

    with atomic_dir(out_dir) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / "weights.safetensors")
        (tmp / "config.json").write_text(json.dumps(info, indent=1, ensure_ascii=False))
        for name in ("best.ckpt", "last.ckpt"):
            if (ckpt_dir / name).exists():
                shutil.copy2(ckpt_dir / name, tmp / name)


class Terminated(SystemExit):
    """SIGTERM during training: unwinds like Ctrl+C (exit code 143), so the MLflow run is marked KILLED."""


@contextmanager
def _sigterm_unwinds():
    def handler(signum, frame):
        raise Terminated(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def set_run_status(logger, status: str) -> None:
    """RUNNING when a run resumes; FAILED or KILLED when training ends badly (Lightning says 'failed' for both)."""
    if status == "RUNNING":
        logger.experiment.update_run(logger.run_id, status="RUNNING")
    else:
        logger.experiment.set_terminated(logger.run_id, status)


def skip_logged_steps(logger) -> None:
    """A resumed run redoes the steps after its last checkpoint with the same numbers: log each
    (metric, step) once, so MLflow's history has no duplicate steps."""
    client, run_id = logger.experiment, logger.run_id
    logged = {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
              for key in client.get_run(run_id).data.metrics}
    if not logged:
        return
    log_metrics = logger.log_metrics

    def once(metrics: dict, step: int | None = None) -> None:
        fresh = {k: v for k, v in metrics.items() if step is None or step > logged.get(k, -1)}
        if fresh:
            log_metrics(fresh, step)

    logger.log_metrics = once


def train(task_name: str, params: Params, *, data_root: Path = DATA_ROOT, models_root: Path = MODELS_ROOT,
          ckpt_root: Path = CKPT_ROOT, track: bool = True, root: Path | None = None, callbacks=()) -> str:
    task, cfg = get_task(task_name, params), params.task(task_name)
    data_dir, out_dir, ckpt_dir = data_root / task_name, models_root / task_name, ckpt_root / task_name
    if task_name not in params.tasks:
        raise PipelineError(f"task {task_name!r} is not in params.yaml's task list")
    check_launch(params)  # before anything waits on a rendezvous or touches a file, before torch loads (seconds)
    task.check_settings()  # a knob its topology ignores: one line, before any file or run is touched

    import lightning as L

    from pipeline import tracking
    from pipeline.datasets.datamodule import PreparedDataModule

    stamp = fingerprint(task_name, params, data_dir)
    # Lightning's checks and the batch split first: a bad trainer section touches no checkpoint and no MLflow run
    trainer, checkpoint = build_trainer(params, task_name, ckpt_dir, None, callbacks)
    dm = PreparedDataModule(data_dir, cfg.train.batch_size, params.seed, cfg.train.block_size)
    check_split(dm, task_name, cfg.train.batch_size, trainer.world_size)
    zero = tracking.is_global_zero()
    store = tracking.tracking_uri(params, root) if track else None
    if track and zero:
        tracking.experiment_id(params, root)  # an unreachable store: one line, before the checkpoints change
    resume_from, saved = _resume_state(ckpt_dir, stamp, zero, store)

    L.seed_everything(params.seed, workers=True, verbose=False)
    model = task.model_class(vocab=dm.vocab, dims=dm.dims(), model=cfg.model.model_dump(),
                             train=cfg.train.model_dump())
    if saved.get("finished"):  # the same training already ended: publish its result again, train nothing
        if not zero:
            return ""
        return publish(task_name, params, model, dm, ckpt_dir, out_dir, checkpoint.state_key, stamp,
                       saved.get("run_id"), saved.get("world_size", trainer.world_size), root, again=True)
    logger = None
    if track and zero:
        tags = tracking.run_tags(params, task_name, task.topology_name, root)
        logger = tracking.make_logger(params, task_name, tags, run_id=saved.get("run_id"), root=root)
    if logger is not None:
        trainer.logger = logger
        if saved.get("run_id"):
            set_run_status(logger, "RUNNING")
            skip_logged_steps(logger)
        logger.log_hyperparams(tracking.task_params(params, task_name))
        logger.experiment.set_tag(logger.run_id, "world_size", str(trainer.world_size))
        if not saved.get("run_id"):  # a resumed run has its dataset already
            tracking.log_dataset(logger.experiment, logger.run_id, task_name, data_dir, task.source.describe())
    run_id = logger.run_id if logger is not None else None
    if zero:
        _write_resume(ckpt_dir, {"fingerprint": stamp, "run_id": run_id, "tracking_uri": store})

    try:
        with _sigterm_unwinds():
            trainer.fit(model, datamodule=dm, ckpt_path=str(resume_from) if resume_from else None)
    except BaseException as err:
        if logger is not None:
            tracking.flush()
            set_run_status(logger, "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    if logger is not None:
        tracking.flush()
    if not trainer.is_global_zero:
        return ""
    _write_resume(ckpt_dir, {"fingerprint": stamp, "run_id": run_id, "tracking_uri": store, "finished": True,
                             "world_size": trainer.world_size})
    return publish(task_name, params, model, dm, ckpt_dir, out_dir, checkpoint.state_key, stamp, run_id,
                   trainer.world_size, root)


def publish(task_name: str, params: Params, model, dm, ckpt_dir: Path, out_dir: Path, best_key: str, stamp: str,
            run_id: str | None, world_size: int, root: Path | None, again: bool = False) -> str:
    """models/<task>/ from the checkpoints: the best epoch's weights; the last epoch's counters."""
    import torch

    from pipeline import tracking

    task, cfg = get_task(task_name, params), params.task(task_name)
    best_path, last_path = ckpt_dir / "best.ckpt", ckpt_dir / "last.ckpt"
    if not best_path.exists() or not last_path.exists():
        raise PipelineError(f"training of {task_name} produced no checkpoint in {ckpt_dir}")
    # weights only: no pickled objects are trusted when loading
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    model.load_state_dict(best["state_dict"])
    # counters and best score from the last checkpoint: under ddp_spawn this process's trainer and
    # callbacks never ran (only the weights come back), so their epoch, step and score read 0 / None
    last = torch.load(last_path, map_location="cpu", weights_only=True)
    score = last["callbacks"][best_key]["best_model_score"]
    best_val, epochs, steps = (float(score) if score is not None else None), last["epoch"] + 1, last["global_step"]
    variant = {"variant": task.source.variant} if task.source.variant else {}  # the source's own topology object
    info = {"task": task_name, "topology": task.topology_name, **variant, "model_class": task.model,
            "hparams": {"vocab": dm.vocab, "dims": dm.dims(), "model": cfg.model.model_dump(),
                        "train": cfg.train.model_dump()},
            "best_val_loss": best_val, "best_epoch": best["epoch"] + 1, "best_global_step": best["global_step"],
            "epochs": epochs, "global_step": steps,
            "world_size": world_size, "seed": params.seed, "fingerprint": stamp,
            "mlflow_run_id": run_id,
            "tracking_uri": tracking.tracking_uri(params, root) if run_id is not None else None}
    write_model_dir(out_dir, model, info, ckpt_dir)
    params_count = sum(p.numel() for p in model.parameters())
    val = f"{best_val:.4f} (epoch {best['epoch'] + 1})" if best_val is not None else "n/a"
    done = "already trained, not retrained:" if again else "trained"
    return (f"{task_name}: {done} {task.topology_name} ({params_count:,} parameters) for {epochs} epochs, "
            f"{steps} steps on {world_size} device(s); best val_loss {val}; wrote {out_dir}/")
