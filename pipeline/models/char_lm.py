"""The character-level language model: next-character prediction, sampled one character at a time.

Batches: pipeline.batch.CharWindowBatch. Serving: a prime (column `prime`) [, length, temperature, top_k,
seed] -> text; the CLI's `sample` verb.

Truncated backpropagation through time with carried state (char-rnn's training): the training and
validation loaders of a character stream (pipeline.datasets.streams) give each batch row the window
that follows the row's previous one, with `first` True where a stream starts. The model keeps the
(h, c) state each row ended with, detached (gradients stop at the window edge), and starts the row's
next window from it; rows with `first` start from zero. Training and validation keep separate
states; a run resumed from a checkpoint (always an epoch end here) starts its epoch from zero, as
the uninterrupted run does. A batch without `first` (hand-made, or `char_windows`) is read from a
zero state: that is the zero-state number evaluation reports beside the carried-state one.

Learning rate: Adam with a linear warm-up over the first `WARMUP` of the steps, then a cosine decay
to `FINAL_LR_FRACTION` of train.lr at the last step (per step, from the trainer's step count).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from pipeline import serving_inputs as inputs
from pipeline.models import evaluation, serving
from pipeline.models.base import masked_cross_entropy
from pipeline.models.one_to_many import OneToMany
from pipeline.topologies import Topology

WARMUP = 0.02  # fraction of the training steps with a linearly rising learning rate
FINAL_LR_FRACTION = 0.02  # the cosine decay ends at this fraction of train.lr
EVAL_BLOCK = 1000  # characters per forward call when evaluation reads a whole text with carried state


def lr_factor(step: int, total: int) -> float:
    """The learning rate at optimizer step `step` (0-based) of `total`, as a fraction of train.lr: a linear
    warm-up over the first WARMUP of the steps, then a cosine decay to FINAL_LR_FRACTION at the last step."""
    warmup = max(1, round(WARMUP * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


class CharLM(OneToMany):
    """Windows of text: x is characters t..t+n-1, y is t+1..t+n. No padding, no <eos>."""

    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        super().__init__(vocab, dims, model, train)
        self.embed = nn.Embedding(self.num_tokens, self.model_cfg.embedding_dim)  # id 0 is a real character
        self._carried: dict[str, tuple[Tensor, Tensor]] = {}  # "train" / "val" -> (h, c), never saved

    @property
    def num_tokens(self) -> int:
        return len(self.vocab["chars"])

    def start_state(self, batch: dict, key: str) -> tuple[Tensor, Tensor] | None:
        """The (h, c) each row starts from: the state its previous window ended with, zero where `first`
        (a stream's start) or when nothing is carried (a batch without `first`, a new batch shape)."""
        state = self._carried.get(key)
        if "first" not in batch or state is None or state[0].shape[1] != batch["x"].shape[0]:
            return None
        keep = (~batch["first"]).to(state[0].dtype).to(state[0].device)[None, :, None]
        return state[0] * keep, state[1] * keep

    def loss_terms(self, batch):
        key = "train" if self.training else "val"
        logits, state = self(batch["x"], self.start_state(batch, key))
        if "first" in batch:  # a stream: carry the state to the row's next window, without its graph
            self._carried[key] = (state[0].detach(), state[1].detach())
        return masked_cross_entropy(logits, batch["y"])

    def on_train_epoch_start(self) -> None:
        self._carried.pop("train", None)  # the loader says so too (`first`): belt and braces

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._carried.pop("val", None)

    def configure_optimizers(self):
        """Adam with the warm-up + cosine schedule (`lr_factor`) over the fit's steps; outside a Trainer (no step
        count to schedule over) the bare optimizer at train.lr, as every other topology's."""
        optimizer = super().configure_optimizers()
        if self._trainer is None:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, total=total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()
    def streams_loss(self, loader) -> tuple[float, int]:
        """(summed loss in nats, predictions) over a stream loader (pipeline.datasets.streams, `first` in every
        batch): each row's state carried from window to window, exactly as validation during training reads the
        val text, so the number equals the epoch's val_loss. Eval mode for the duration."""
        was_training = self.training
        self.eval()
        self._carried.pop("val", None)
        total, count = 0.0, 0
        try:
            for batch in loader:
                s, n = self.loss_terms({k: v.to(self.device) for k, v in batch.items()})
                total, count = total + float(s), count + int(n)
        finally:
            self.train(was_training)
            self._carried.pop("val", None)
        return total, count

    @torch.no_grad()
    def text_loss(self, ids: np.ndarray | Tensor, block: int = EVAL_BLOCK) -> tuple[float, int]:
        """(summed loss in nats, predictions) of the text `ids` (n,) read in one piece: characters 1..n-1, each
        predicted from everything before it (the state carried across forward calls of `block` characters;
        exactly one pass over the whole text). Eval mode for the duration."""
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=self.device)
        was_training, state = self.training, None
        self.eval()
        total, count = 0.0, 0
        try:
            for start in range(0, len(ids) - 1, block):
                x, y = ids[start : start + block][None], ids[start + 1 : start + block + 1][None]
                x = x[:, : y.shape[1]]
                logits, state = self(x, state)
                s, n = masked_cross_entropy(logits, y)
                total, count = total + float(s), count + int(n)
        finally:
            self.train(was_training)
        return total, count

    def trace(self, batch):
        return self.lstm(self.embed(batch["x"]), return_gates=True)[2]

    def encode(self, text: str) -> list[int]:
        index = {c: i for i, c in enumerate(self.vocab["chars"])}
        unknown = sorted({c for c in text if c not in index})
        if unknown:
            raise ValueError(f"characters not in the model's vocabulary: {''.join(unknown)!r}")
        return [index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab["chars"][i] for i in ids)

    @torch.no_grad()
    def sample(self, prime: str, length: int, temperature: float = 1.0, top_k: int | None = None,
               seed: int | None = None) -> str:
        """Warm the state on `prime`, then emit `length` characters; temperature -> 0 is greedy."""
        if not prime:
            raise ValueError("the prime must hold at least one character")
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        ids = torch.tensor([self.encode(prime)], device=self.device)
        new = self.generate(ids, length, temperature, top_k, stop_token=None, generator=generator)[0]
        return prime + self.decode(new)


SAMPLE_PRIMES = ("ROMEO:", "First Citizen:\n", "The king")  # evaluation's samples (those of known characters)


class CharLMTopology(Topology):
    name = "char_lm"
    model_class = CharLM
    explorer = "pipeline.explore:CharLMExplorer"
    key_metric, higher_is_better = "loss", False
    eval_split = "val"  # the text has no test part
    verbs = frozenset({"sample"})

    def settings(self, inputs: str) -> frozenset[str]:
        return frozenset({"model.embedding_dim", "train.block_size"})

    def evaluate(self, model, dm, split, plots, samples):
        """Loss (nats per character) and bits per character on held-out text read with carried state, as
        validation during training reads it (train.batch_size consecutive streams, CharLM.streams_loss: equal to
        the best checkpoint's val_loss). Beside it `loss_one_piece`, the whole text in one pass
        (CharLM.text_loss), and `loss_zero_state`, non-overlapping windows of train.block_size each from a zero
        state (the old reading). Samples from a few primes."""
        ids = {s: np.load(dm.data_dir / f"{s}.npz")["ids"] for s in ("train", split)}
        total, count = model.streams_loss(dm.stream_loader(split))
        loss = total / count
        one_total, one_count = model.text_loss(ids[split])
        base = evaluation.unigram_nll(ids["train"], ids[split], len(dm.vocab["chars"]))
        metrics = {"loss": loss, "bits_per_char": loss / math.log(2), "perplexity": math.exp(loss),
                   "loss_one_piece": one_total / one_count,
                   "loss_zero_state": evaluation.token_loss(model, dm, split)}
        chars = dm.vocab["chars"]
        primes = [p for p in SAMPLE_PRIMES if set(p) <= set(chars)]
        if not primes:  # another text: its held-out part's first characters
            primes = ["".join(chars[i] for i in ids[split][:8].tolist())]
        texts = []
        for prime in primes:
            for temperature in (0.5, 0.8, 1.0):
                text = model.sample(prime, 300, temperature=temperature, seed=0)
                texts.append(f"--- prime {prime!r}, temperature {temperature}\n{text}\n")
        (samples / "samples.txt").write_text("\n".join(texts))
        return metrics, {"name": "unigram characters", "loss": base, "bits_per_char": base / math.log(2)}

    def heatmap_labels(self, batch, vocab):
        return [vocab["chars"][i] for i in batch["x"][0].tolist()]

    def input_example(self, info, source_example):
        chars = info["hparams"]["vocab"]["chars"]
        primes = [p for p in ("ROMEO:", "The ") if set(p) <= set(chars)] or [chars[-1]]
        return pd.DataFrame({"prime": (primes * 2)[:2], "length": [40, None],  # a partly filled batch
                             "temperature": [0.8, 0.0]})

    def predict(self, pyfunc, model_input):
        from pipeline.serving_defaults import CHARLM, MAX_CHARS

        known = set(pyfunc.vocab["chars"])

        def prime(value, where: str) -> str:
            value = inputs.text(value, where)
            if not value:
                raise inputs.InputError(f"{where}: empty; the prime needs at least one character")
            unknown = sorted(set(value) - known)
            if unknown:
                raise inputs.InputError(f"{where}: characters the model does not know: {''.join(unknown)!r}")
            return value

        _, rows = inputs.generations(model_input, prime="prime", seed="seed", defaults=CHARLM,
                                     cap=MAX_CHARS, unit="characters", check_prime=prime)
        return pd.DataFrame({"text": pd.Series(
            [pyfunc.model.sample(r.prime, r.length, r.temperature, r.top_k, seed=r.seed) for r in rows],
            dtype=object)})

    def cli_input(self, pyfunc, names, options):
        from pipeline.serving_defaults import MAX_CHARS

        checked = serving.sampling_options(options, MAX_CHARS)
        return pd.DataFrame({"prime": names, **{k: [v] * len(names) for k, v in checked.items()}})

    def cli_sample(self, pyfunc, prime, options):
        from pipeline.serving_defaults import CHARLM, MAX_CHARS

        checked = serving.sampling_options(options, MAX_CHARS)
        if prime is None:  # the default prime, or one character this model knows (another text)
            chars = pyfunc.vocab["chars"]
            prime = CHARLM.prime if set(CHARLM.prime) <= set(chars) else next(
                (c for c in chars if c.isalpha()), chars[-1])
        return pd.DataFrame({"prime": [prime], **{k: [v] for k, v in checked.items()}})


TOPOLOGY = CharLMTopology()
