"""one_to_many: a seed token -> a sequence (melody: the first note -> the rest of the line).

Trained with teacher forcing (step t sees the true token t and predicts t+1); generation feeds
the model's own choice back in, one token at a time, until <eos> or a length limit. The char
LM is the same autoregressive machine over a continuous stream, so it subclasses this one.

Batches: pipeline.batch.GeneratorBatch. Serving: a seed token (column `seed`, e.g. the note "C5|1.0")
[, length, temperature, top_k, random_seed] -> seed, melody (the tokens joined by spaces).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from fractions import Fraction
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pipeline import serving_inputs as inputs
from pipeline.batch import SEQUENCE_EOS, lengths_mask
from pipeline.models import evaluation, serving
from pipeline.models.base import RecurrentModule, core, head, masked_cross_entropy, token_embedding
from pipeline.topologies import Topology

EOS = SEQUENCE_EOS  # prepared token vocabularies: 0 <pad>, 1 <eos>


def check_sampling(length: int, temperature: float, top_k: int | None) -> None:
    """ValueError (one line) unless length is a whole number >= 0, temperature a finite number >= 0
    (0 = greedy) and top_k None or a whole number >= 1 (a top_k at or above the vocabulary cuts nothing)."""
    if isinstance(length, bool) or not isinstance(length, Integral) or length < 0:
        raise ValueError(f"length must be a whole number >= 0, got {length!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
        raise ValueError(f"top_k must be a whole number >= 1 (or None: no cut), got {top_k!r}")


@contextmanager
def one_thread():
    """Torch's intra-op threads set to 1 for a block, then put back. Generation runs one token at a time on tiny
    tensors, where a second thread only adds synchronisation: with the other core busy, a char LM step took
    1.9 ms on one thread and 23 ms on two (process-wide setting: a concurrent block may see it)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def pick_token(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """Next token from (B, V) logits: the argmax at temperature 0, else a draw from softmax(logits / T)
    restricted to the top_k largest logits (ties at the k-th value stay in).

    Computed as softmax((logits - max) / T) in float64: every scaled logit is <= 0 and the largest is exactly 0,
    so any T > 0, down to the smallest double (1e-40, 5e-324), gives a valid distribution that tends to the
    argmax (ties share it) as T -> 0, where logits / T in float32 overflowed to inf - inf = NaN below ~1e-38."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.double()
    scaled = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(-1)


class OneToMany(RecurrentModule):
    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        super().__init__(vocab, dims, model, train)
        self.embed = token_embedding(self.num_tokens, self.model_cfg)
        self.lstm = core(self.model_cfg.embedding_dim, self.model_cfg)
        self.head = head(self.model_cfg, self.num_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.vocab["tokens"])

    def forward(self, tokens: Tensor, state=None, lengths: Tensor | None = None):
        out, state = self.lstm(self.embed(tokens), state, lengths=lengths)
        return self.head(out), state

    def teacher_forcing(self, batch) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs, targets, mask): input token t predicts token t+1, up to each <eos>."""
        tokens, lengths = batch["tokens"], batch["lengths"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = lengths_mask(lengths - 1, targets.shape[1])
        return inputs, targets, mask

    def loss_terms(self, batch):
        inputs, targets, mask = self.teacher_forcing(batch)
        logits, _ = self(inputs, lengths=(batch["lengths"] - 1).clamp(min=1))
        return masked_cross_entropy(logits, targets, mask)

    def trace(self, batch):
        inputs, _, _ = self.teacher_forcing(batch)
        return self.lstm(self.embed(inputs), lengths=(batch["lengths"] - 1).clamp(min=1), return_gates=True)[2]

    def step_predictions(self, batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Teacher forcing over a batch, step by step as `trace` reads it: (inputs (B, T) the token ids read,
        lengths (B,) the real steps per row, targets (B, T) the token each step should predict, logits (B, T, V))."""
        inputs, targets, _ = self.teacher_forcing(batch)
        lengths = (batch["lengths"] - 1).clamp(min=1)
        logits, _ = self(inputs, lengths=lengths)
        return inputs, lengths, targets, logits

    @torch.no_grad()
    def generate(self, prime: Tensor, length: int, temperature: float = 1.0, top_k: int | None = None,
                 stop_token: int | None = EOS, generator: torch.Generator | None = None) -> list[list[int]]:
        """Warm the state on `prime` (B, P), then emit up to `length` tokens one at a time.

        Temperature 0 is greedy; see `pick_token` and `check_sampling` (ValueError on a negative length, a
        temperature that is negative, NaN or infinite, a top_k below 1). Returns each sequence's new tokens,
        cut before `stop_token`. Cost: one recurrent step per token (no cap here: serving caps the length)."""
        check_sampling(length, temperature, top_k)
        with one_thread():
            logits, state = self(prime)
            last = logits[:, -1]
            emitted, done = [], torch.zeros(prime.shape[0], dtype=torch.bool, device=prime.device)
            for _ in range(length):
                token = pick_token(last, temperature, top_k, generator)
                emitted.append(token)
                if stop_token is not None:
                    done |= token == stop_token
                    if bool(done.all()):
                        break
                logits, state = self(token[:, None], state)
                last = logits[:, -1]
        rows = torch.stack(emitted, 1).tolist() if emitted else [[] for _ in range(prime.shape[0])]
        if stop_token is not None:
            rows = [row[: row.index(stop_token)] if stop_token in row else row for row in rows]
        return rows


class OneToManyTopology(Topology):
    name = "one_to_many"
    model_class = OneToMany
    explorer = "pipeline.explore:MelodyExplorer"
    key_metric, higher_is_better = "nll", False

    def settings(self, inputs: str) -> frozenset[str]:
        return frozenset({"model.embedding_dim"})

    def evaluate(self, model, dm, split, plots, samples):
        """Per-token NLL of the held-out sequences given their seed; generated melodies as MIDI."""
        nll = evaluation.token_loss(model, dm, split)
        arrays = {s: dm.split(s) for s in ("train", split)}

        def targets(a):  # what the model predicts: every token after the seed, up to and with <eos>
            return np.concatenate([row[1:n] for row, n in zip(a["tokens"], a["lengths"])])

        base = evaluation.unigram_nll(targets(arrays["train"]), targets(arrays[split]), len(dm.vocab["tokens"]))
        _write_melodies(model, dm.vocab["tokens"], arrays[split], samples)
        return ({"nll": nll, "perplexity": math.exp(nll)},
                {"name": "unigram notes", "nll": base, "perplexity": math.exp(base)})

    def heatmap_labels(self, batch, vocab):
        return [vocab["tokens"][i] for i in batch["tokens"][0].tolist()]

    def input_example(self, info, source_example):
        from pipeline.serving_defaults import MELODY

        vocab = info["hparams"]["vocab"]
        return pd.DataFrame({"seed": [vocab["tokens"][2]], "length": [16], "temperature": [MELODY.temperature],
                             "top_k": [MELODY.top_k], "random_seed": [0]})

    def predict(self, pyfunc, model_input):
        from pipeline.serving_defaults import MAX_NOTES, MELODY

        tokens = pyfunc.vocab["tokens"]
        index = {tok: i for i, tok in enumerate(tokens) if i >= 2}  # not <pad>, <eos>

        def note(value, where: str) -> str:
            value = inputs.text(value, where)
            if value not in index:
                raise inputs.InputError(f"{where}: unknown seed note {value!r}; a note is pitch|quarter-length "
                                        f"as in the training melodies, e.g. {tokens[2]!r}")
            return value

        _, rows = inputs.generations(model_input, prime="seed", seed="random_seed", defaults=MELODY,
                                     cap=MAX_NOTES, unit="notes", check_prime=note)
        melodies = []
        for r in rows:
            generator = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
            line = pyfunc.model.generate(torch.tensor([[index[r.prime]]]), r.length, r.temperature, r.top_k,
                                         generator=generator)[0]
            melodies.append(" ".join([r.prime] + [tokens[i] for i in line]))
        return pd.DataFrame({"seed": pd.Series([r.prime for r in rows], dtype=object),
                             "melody": pd.Series(melodies, dtype=object)})

    def cli_input(self, pyfunc, names, options):
        from pipeline.serving_defaults import MAX_NOTES

        checked = serving.sampling_options(options, MAX_NOTES)
        if "seed" in checked:
            checked["random_seed"] = checked.pop("seed")
        return pd.DataFrame({"seed": names, **{k: [v] * len(names) for k, v in checked.items()}})


def _write_melodies(model, tokens: list[str], arrays: dict, samples: Path, count: int = 4) -> None:
    """Greedy and sampled continuations of held-out seed notes: MIDI files and a piano roll."""
    import music21
    from matplotlib.figure import Figure

    seeds = torch.as_tensor(arrays["tokens"][:count, :1])
    generator = torch.Generator().manual_seed(0)
    lines = model.generate(seeds, 48, temperature=0.8, top_k=8, generator=generator)
    fig = Figure(figsize=(10, 2.2 * count))
    axes = np.atleast_1d(fig.subplots(count, 1, sharex=True))
    for k, (seed, line) in enumerate(zip(seeds[:, 0].tolist(), lines)):
        notes = [tokens[i] for i in [seed, *line] if i > 1]
        _to_midi(notes, samples / f"melody_{k}.mid")
        t = 0.0
        for pitch, dur in map(_note, notes):
            if pitch != "rest":
                axes[k].broken_barh([(t, dur)], (music21.pitch.Pitch(pitch).midi - 0.4, 0.8))
            t += dur
        axes[k].set_ylabel(f"seed {tokens[seed].split('|')[0]}\nMIDI pitch")
    axes[-1].set_xlabel("time (quarter notes)")
    fig.suptitle("generated melodies (temperature 0.8, top-k 8) from held-out seed notes")
    fig.tight_layout()
    fig.savefig(samples / "piano_roll.png", dpi=100)


def _note(token: str) -> tuple[str, float]:
    """"C5|1.0" or "rest|1/3" -> (pitch, quarter length)."""
    pitch, duration = token.split("|")
    return pitch, float(Fraction(duration))


def _to_midi(notes: list[str], path: Path) -> None:
    import music21

    stream = music21.stream.Stream()
    for pitch, ql in map(_note, notes):
        stream.append(music21.note.Rest(quarterLength=ql) if pitch == "rest"
                      else music21.note.Note(pitch, quarterLength=ql))
    stream.write("midi", fp=str(path))


TOPOLOGY = OneToManyTopology()
