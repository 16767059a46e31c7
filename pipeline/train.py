"""Stage `train`: data/prepared/<task>/ -> models/<task>/ (weights, config, checkpoints, run id).

    python -m pipeline train <task>

Checkpoints live in checkpoints/<task>/ (a DVC `persist` output) next to a fingerprint of
everything that shapes the run; a rerun with the same fingerprint resumes from `last.ckpt`,
so a killed training continues where it stopped and ends where an uninterrupted one ends.
models/<task>/ is written only after training succeeded, in one rename.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pipeline.config import Params, PipelineError, first_line
from pipeline.tasks import get_task

DATA_ROOT, MODELS_ROOT, CKPT_ROOT = Path("data/prepared"), Path("models"), Path("checkpoints")


def fingerprint(task: str, params: Params, data_dir: Path) -> str:
    from pipeline.datasets.prepared import load_manifest

    what = {"seed": params.seed, "trainer": params.trainer.model_dump(),
            "task": params.task(task).model_dump(mode="json"), "data": load_manifest(data_dir)["content_sha256"]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _resume_state(ckpt_dir: Path, stamp: str, zero: bool) -> tuple[Path | None, str | None]:
    """(last checkpoint, MLflow run id) to resume from; rank 0 clears the folder when anything changed."""
    meta = ckpt_dir / "resume.json"
    if meta.exists():
        saved = json.loads(meta.read_text())
        last = ckpt_dir / "last.ckpt"
        if saved.get("fingerprint") == stamp and last.exists():
            if zero:
                print(f"resuming from {last}")
            return last, saved.get("run_id")
    if zero:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    return None, None


def build_trainer(params: Params, task: str, ckpt_dir: Path, logger, extra_callbacks=()):
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = params.task(task).train
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min",
                                 save_top_k=1, save_last=True, enable_version_counter=False)
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
            callbacks=[checkpoint, *extra_callbacks],
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


def train(task_name: str, params: Params, *, data_root: Path = DATA_ROOT, models_root: Path = MODELS_ROOT,
          ckpt_root: Path = CKPT_ROOT, track: bool = True, root: Path = Path("."), callbacks=()) -> str:
    import lightning as L
    import torch

    from pipeline import tracking
    from pipeline.datasets.datamodule import PreparedDataModule

    task, cfg = get_task(task_name), params.task(task_name)
    data_dir, out_dir, ckpt_dir = data_root / task_name, models_root / task_name, ckpt_root / task_name
    if task_name not in params.tasks:
        raise PipelineError(f"task {task_name!r} is not in params.yaml's task list")
    stamp = fingerprint(task_name, params, data_dir)
    # Lightning's checks and the batch split first: a bad trainer section touches no checkpoint and no MLflow run
    trainer, checkpoint = build_trainer(params, task_name, ckpt_dir, None, callbacks)
    zero = tracking.is_global_zero()
    resume_from, run_id = _resume_state(ckpt_dir, stamp, zero)

    L.seed_everything(params.seed, workers=True, verbose=False)
    dm = PreparedDataModule(data_dir, cfg.train.batch_size, params.seed, cfg.train.block_size)
    model = task.model_class(vocab=dm.vocab, dims=dm.dims(), model=cfg.model.model_dump(),
                             train=cfg.train.model_dump())
    logger = None
    if track and zero:
        tags = tracking.run_tags(params, task_name, task.topology, root)
        logger = tracking.make_logger(params, task_name, tags, run_id=run_id, root=root)
    if logger is not None:
        trainer.logger = logger
        logger.log_hyperparams(tracking.task_params(params, task_name))
        logger.experiment.set_tag(logger.run_id, "world_size", str(trainer.world_size))
        tracking.log_dataset(logger.experiment, logger.run_id, task_name, data_dir)
        (ckpt_dir / "resume.json").write_text(json.dumps({"fingerprint": stamp, "run_id": logger.run_id}))
    elif zero:
        (ckpt_dir / "resume.json").write_text(json.dumps({"fingerprint": stamp, "run_id": None}))

    try:
        trainer.fit(model, datamodule=dm, ckpt_path=str(resume_from) if resume_from else None)
    finally:
        if logger is not None:
            tracking.flush()
    if not trainer.is_global_zero:
        return ""
    best = Path(checkpoint.best_model_path or ckpt_dir / "best.ckpt")
    if not best.exists():
        raise PipelineError(f"training of {task_name} produced no checkpoint in {ckpt_dir}")
    # weights only: no pickled objects are trusted when loading
    weights = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(weights)
    # counters and best score from the last checkpoint: under ddp_spawn this process's trainer and
    # callbacks never ran (only the weights come back), so their epoch, step and score read 0 / None
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    score = last["callbacks"][checkpoint.state_key]["best_model_score"]
    best_val, epochs, steps = (float(score) if score is not None else None), last["epoch"] + 1, last["global_step"]
    info = {"task": task_name, "topology": task.topology, "model_class": task.model,
            "hparams": {"vocab": dm.vocab, "dims": dm.dims(), "model": cfg.model.model_dump(),
                        "train": cfg.train.model_dump()},
            "best_val_loss": best_val, "epochs": epochs, "global_step": steps,
            "world_size": trainer.world_size, "seed": params.seed, "fingerprint": stamp,
            "mlflow_run_id": logger.run_id if logger is not None else None,
            "tracking_uri": tracking.tracking_uri(params, root) if logger is not None else None}
    write_model_dir(out_dir, model, info, ckpt_dir)
    params_count = sum(p.numel() for p in model.parameters())
    val = f"{best_val:.4f}" if best_val is not None else "n/a"
    return (f"{task_name}: trained {task.topology} ({params_count:,} parameters) for {epochs} epochs, "
            f"{steps} steps on {trainer.world_size} device(s); best val_loss {val}; wrote {out_dir}/")
