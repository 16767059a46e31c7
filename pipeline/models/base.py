"""What every topology shares: the GateLSTM core, inputs, heads, the loss over a global batch,
the NaN guard, the optimizer, and per-sample randomness in training steps.

A subclass says how a batch becomes (summed loss, number of predictions) in `loss_terms`, and
how a batch becomes a GateTrace in `trace`. Everything else is here, once.
"""

from __future__ import annotations

import contextlib

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ModelConfig, PipelineError, TrainConfig
from pipeline.lstm import GateLSTM, GateTrace
from pipeline.models import randomness
from pipeline.models.randomness import SampleDropout


class NonFiniteLossError(PipelineError):
    pass


def token_embedding(num_tokens: int, cfg: ModelConfig) -> nn.Embedding:
    return nn.Embedding(num_tokens, cfg.embedding_dim, padding_idx=0)  # id 0 is padding everywhere


class SampleGateLSTM(GateLSTM):
    """GateLSTM whose inter-layer dropout masks are per sample (pipeline.models.randomness)."""

    def inter_layer_dropout(self, out: Tensor, batch_sizes: Tensor | None, sorted_indices: Tensor | None) -> Tensor:
        if batch_sizes is not None:
            return randomness.packed_dropout(out, self.dropout, batch_sizes, sorted_indices)
        return randomness.dropout(out, self.dropout, batch_dim=0 if self.batch_first else 1)


def core(input_size: int, cfg: ModelConfig, bidirectional: bool = False) -> GateLSTM:
    """The recurrent core, batch-first; bidirectional only where the topology reads whole sequences."""
    return SampleGateLSTM(input_size, cfg.hidden_size, cfg.num_layers, batch_first=True,
                          dropout=cfg.dropout if cfg.num_layers > 1 else 0.0, bidirectional=bidirectional)


def head(cfg: ModelConfig, num_outputs: int, in_features: int | None = None) -> nn.Sequential:
    return nn.Sequential(SampleDropout(cfg.dropout), nn.Linear(in_features or cfg.hidden_size, num_outputs))


def masked_cross_entropy(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over the positions where mask is True, and their count."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    if mask is None:
        return losses.sum(), torch.tensor(losses.numel(), device=losses.device)
    mask = mask.reshape(-1)
    return losses[mask].sum(), mask.sum()


class RecurrentModule(L.LightningModule):
    """Base LightningModule. Hyper-parameters are plain JSON-able dicts, so a model is rebuilt from
    its config.json plus a weights file, with no pickled objects anywhere."""

    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run logs params.yaml's names (tracking.task_params)
        self.vocab, self.dims = vocab, dims
        self.model_cfg, self.train_cfg = ModelConfig(**model), TrainConfig(**train)
        self._base_seed = torch.initial_seed()  # seed_everything ran before us: the run's seed

    # --- per topology -----------------------------------------------------------------------

    def loss_terms(self, batch: dict) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def trace(self, batch: dict) -> GateTrace:
        raise NotImplementedError

    # --- shared training logic ----------------------------------------------------------------

    def _global_mean(self, total: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """The loss to backpropagate and the global batch's mean loss to log.

        DDP averages gradients over ranks, so each rank backpropagates total * world / global
        count: the gradient is then the one of the whole global batch's mean, even when ranks
        hold different numbers of steps (variable lengths)."""
        count = count.to(total.dtype)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            mean = total / count
            return mean, mean.detach()
        both = self.all_gather(torch.stack([total.detach(), count])).reshape(world, 2).sum(0)
        return total * world / both[1], both[0] / both[1]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        # every draw in this step (dropout, augmentation) is a function of (seed, epoch, global sample index);
        # a hand-made batch without `index` (not from PreparedDataModule) draws from torch's RNG instead
        draws = (randomness.per_sample(self._base_seed, self.current_epoch, batch["index"]) if "index" in batch
                 else contextlib.nullcontext())
        with draws:
            terms = self.loss_terms(batch)
        loss, value = self._global_mean(*terms)
        if not torch.isfinite(value):
            raise NonFiniteLossError(
                f"train_loss is {value.item()} at step {self.global_step} (epoch {self.current_epoch}): "
                "lower train.lr or set train.gradient_clip_val")
        self.log("train_loss", value, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, device=self.device)  # (summed loss, predictions) on this rank

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        total, count = self.loss_terms(batch)
        self._val_sums += torch.stack([total.detach(), count.to(total.dtype)])

    def on_validation_epoch_end(self) -> None:
        # The mean over every rank's predictions. Not self.log(sync_dist=True, batch_size=count): Lightning
        # mean-syncs its integer batch-size sum and floors it when ranks hold unequal counts, inflating
        # val_loss (Lightning-AI/pytorch-lightning#21859; 6% on 17 samples over 2 ranks).
        total, count = self.all_gather(self._val_sums).reshape(-1, 2).sum(0)
        self.log("val_loss", total / count, prog_bar=True, sync_dist=True)  # equal on every rank already

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Per-sample draws need no RNG state (pipeline.models.randomness). Anything else that draws from
        # torch's RNG gets (seed, epoch) at the epoch's first batch, the same on every rank, so a run
        # resumed at an epoch boundary draws what the uninterrupted one drew. Not in on_train_epoch_start:
        # creating the DataLoader iterator draws from the global RNG after that hook in an ordinary epoch,
        # before it in a resumed one.
        if batch_idx == 0:
            torch.manual_seed(self._base_seed + 7919 * (self.current_epoch + 1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.train_cfg.lr, weight_decay=self.train_cfg.weight_decay)
