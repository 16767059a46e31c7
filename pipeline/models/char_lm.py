"""The character-level language model: next-character prediction, sampled one character at a time.

Batches: pipeline.batch.CharWindowBatch. Serving: a prime (column `prime`) [, length, temperature, top_k,
seed] -> text; the CLI's `sample` verb.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline import serving_inputs as inputs
from pipeline.models import evaluation, serving
from pipeline.models.base import masked_cross_entropy
from pipeline.models.one_to_many import OneToMany
from pipeline.topologies import Topology


class CharLM(OneToMany):
    """Windows of text: x is characters t..t+n-1, y is t+1..t+n. No padding, no <eos>."""

    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        super().__init__(vocab, dims, model, train)
        self.embed = nn.Embedding(self.num_tokens, self.model_cfg.embedding_dim)  # id 0 is a real character

    @property
    def num_tokens(self) -> int:
        return len(self.vocab["chars"])

    def loss_terms(self, batch):
        logits, _ = self(batch["x"])
        return masked_cross_entropy(logits, batch["y"])

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
    key_metric, higher_is_better = "loss", False
    eval_split = "val"  # the text has no test part
    verbs = frozenset({"sample"})

    def settings(self, inputs: str) -> frozenset[str]:
        return frozenset({"model.embedding_dim", "train.block_size"})

    def evaluate(self, model, dm, split, plots, samples):
        """Loss (nats per character) and bits per character on held-out text; samples from a few primes."""
        loss = evaluation.token_loss(model, dm, split)
        ids = {s: np.load(dm.data_dir / f"{s}.npz")["ids"] for s in ("train", split)}
        base = evaluation.unigram_nll(ids["train"], ids[split], len(dm.vocab["chars"]))
        metrics = {"loss": loss, "bits_per_char": loss / math.log(2), "perplexity": math.exp(loss)}
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
