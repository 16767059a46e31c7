"""Every topology on tiny synthetic batches built here: it learns, it respects lengths, it decodes
as greedy/beam/sampling promise, it traces its gates, and a non-finite loss stops it in one line.

No prepared data: each model is built directly from small vocab/dims/model/train dicts.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import PipelineError
from pipeline.lstm import GateTrace
from pipeline.models.base import NonFiniteLossError
from pipeline.models.char_lm import CharLM
from pipeline.models.many_to_many import ManyToMany
from pipeline.models.many_to_one import ManyToOne
from pipeline.models.one_to_many import EOS as MELODY_EOS
from pipeline.models.one_to_many import OneToMany
from pipeline.models.one_to_one import OneToOne
from pipeline.models.seq2seq import BOS, EOS, Seq2Seq

HIDDEN, STEPS = 24, 30
TOKENS = ["<pad>", "<eos>", "a", "b", "c", "d", "e", "f"]  # 0 pad, 1 <eos>: the prepared convention
WORDS = ["<pad>", "<unk>", "<bos>", "<eos>", "w4", "w5", "w6", "w7", "w8", "w9"]  # translation's convention


def build(cls, vocab: dict, dims: dict | None = None, seed: int = 0, lr: float = 0.02, **model):
    torch.manual_seed(seed)
    cfg = {"hidden_size": HIDDEN, "embedding_dim": 12, "dropout": 0.0, **model}
    return cls(vocab=vocab, dims=dims or {}, model=cfg, train={"lr": lr, "batch_size": 16})


def lengths_in(gen: torch.Generator, n: int, low: int, high: int) -> torch.Tensor:
    """n lengths in [low, high], the longest always present (batches are trimmed to their longest)."""
    lengths = torch.randint(low, high + 1, (n,), generator=gen)
    lengths[0] = high
    return lengths


def beyond(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) True on padding positions."""
    return torch.arange(T)[None, :] >= lengths[:, None]


# --- one tiny learnable task per model ---------------------------------------------------------
# Each returns (model, batch). `PADDING` says which arrays each length array describes.


def one_to_one():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 5, 6, generator=gen)
    y = (x[:, :, :3].mean((1, 2)) > x[:, :, 3:].mean((1, 2))).long() + 2 * (x[:, 0, 0] > 0.5).long()
    return build(OneToOne, {"labels": list("abcd")}, {"input_shape": [5, 6]}), {"x": x, "y": y}


def many_to_one_tokens():
    gen = torch.Generator().manual_seed(2)
    lengths = lengths_in(gen, 16, 2, 7)
    tokens = torch.randint(2, len(TOKENS), (16, 7), generator=gen).masked_fill(beyond(lengths, 7), 0)
    y = (tokens[:, 0] >= 5).long()  # the label sits at the first step: the state must carry it
    model = build(ManyToOne, {"tokens": TOKENS, "labels": ["neg", "pos"]}, dropout=0.1)
    return model, {"tokens": tokens, "lengths": lengths, "y": y}


def many_to_one_bidirectional():
    model, batch = many_to_one_tokens()
    torch.manual_seed(0)
    return type(model)(model.vocab, model.dims, {**model.model_cfg.model_dump(), "bidirectional": True},
                       model.train_cfg.model_dump()), batch


def many_to_one_features():
    gen = torch.Generator().manual_seed(3)
    lengths = lengths_in(gen, 16, 3, 9)
    x = torch.randn(16, 9, 2, generator=gen).masked_fill(beyond(lengths, 9)[..., None], 0.0)
    y = (x[..., 0].sum(1) > 0).long() + 2 * (x[..., 1].sum(1) > 0).long()
    model = build(ManyToOne, {"labels": list("abcd")}, {"input_shape": [9, 2]}, num_layers=2)
    return model, {"x": x, "lengths": lengths, "y": y}


def many_to_many():
    gen = torch.Generator().manual_seed(4)
    lengths = lengths_in(gen, 8, 4, 10)
    x = torch.randn(8, 10, 3, generator=gen).masked_fill(beyond(lengths, 10)[..., None], 0.0)
    y = (x[..., 0] > 0).long() + (x[..., 1] > 0).long()
    y = y.masked_fill(beyond(lengths, 10), 0)
    model = build(ManyToMany, {"labels": ["lo", "mid", "hi"]}, {"input_shape": [10, 3]})
    return model, {"x": x, "y": y, "lengths": lengths}


def many_to_many_bidirectional():
    model, batch = many_to_many()
    torch.manual_seed(0)
    return type(model)(model.vocab, model.dims, {**model.model_cfg.model_dump(), "bidirectional": True},
                       model.train_cfg.model_dump()), batch


def one_to_many():
    """Melodies that climb a - b - c - d - e - f cyclically from a seed, of varied length, then <eos>."""
    gen = torch.Generator().manual_seed(5)
    lengths = lengths_in(gen, 12, 3, 9)  # <eos> included
    tokens = torch.zeros(12, 9, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        start = int(torch.randint(0, 6, (1,), generator=gen))
        tokens[i, : n - 1] = 2 + (start + torch.arange(n - 1)) % 6
        tokens[i, n - 1] = MELODY_EOS
    return build(OneToMany, {"tokens": TOKENS}), {"tokens": tokens, "lengths": lengths}


def seq2seq(attention: bool = True, bidirectional: bool = False):
    """Reverse the source words: <bos> reversed <eos>."""
    gen = torch.Generator().manual_seed(6)
    src_lengths = lengths_in(gen, 16, 2, 5)
    src = torch.randint(4, len(WORDS), (16, 5), generator=gen).masked_fill(beyond(src_lengths, 5), 0)
    tgt_lengths = src_lengths + 2
    tgt = torch.zeros(16, 7, dtype=torch.long)
    for i, n in enumerate(src_lengths.tolist()):
        tgt[i, : n + 2] = torch.tensor([BOS, *src[i, :n].flip(0).tolist(), EOS])
    model = build(Seq2Seq, {"src_tokens": WORDS, "tgt_tokens": WORDS}, attention=attention, lr=0.03,
                  bidirectional=bidirectional)
    return model, {"src": src, "src_lengths": src_lengths, "tgt": tgt, "tgt_lengths": tgt_lengths}


def seq2seq_plain():
    return seq2seq(attention=False)


def seq2seq_bidirectional():
    return seq2seq(bidirectional=True)


def seq2seq_bidirectional_plain():
    return seq2seq(attention=False, bidirectional=True)


def char_lm():
    gen = torch.Generator().manual_seed(7)
    text = "the cat sat on the mat. " * 8
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    starts = torch.randint(0, len(ids) - 17, (8,), generator=gen)
    windows = torch.stack([ids[s : s + 17] for s in starts.tolist()])
    return build(CharLM, {"chars": chars}), {"x": windows[:, :-1], "y": windows[:, 1:]}


CASES = {f.__name__: f for f in (one_to_one, many_to_one_tokens, many_to_one_features, many_to_many, one_to_many,
                                 seq2seq, seq2seq_plain, char_lm, many_to_one_bidirectional,
                                 many_to_many_bidirectional, seq2seq_bidirectional, seq2seq_bidirectional_plain)}
# length array -> the padded arrays it describes, per case
PADDING = {
    "many_to_one_tokens": {"lengths": ("tokens",)},
    "many_to_one_features": {"lengths": ("x",)},
    "many_to_many": {"lengths": ("x", "y")},
    "one_to_many": {"lengths": ("tokens",)},
    "seq2seq": {"src_lengths": ("src",), "tgt_lengths": ("tgt",)},
    "seq2seq_plain": {"src_lengths": ("src",), "tgt_lengths": ("tgt",)},
    "many_to_one_bidirectional": {"lengths": ("tokens",)},
    "many_to_many_bidirectional": {"lengths": ("x", "y")},
    "seq2seq_bidirectional": {"src_lengths": ("src",), "tgt_lengths": ("tgt",)},
    "seq2seq_bidirectional_plain": {"src_lengths": ("src",), "tgt_lengths": ("tgt",)},
}


def mean_loss(model, batch) -> float:
    total, count = model.loss_terms(batch)
    return float(total / count)


@cache
def trained(name: str):
    """(model in eval mode, batch, loss before, per-step training losses): STEPS Adam steps on the batch."""
    model, batch = CASES[name]()
    optimizer = model.configure_optimizers()
    model.eval()
    with torch.no_grad():
        before = mean_loss(model, batch)
    model.train()
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = model.training_step(batch, step)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return model, batch, before, losses


# --- learning and shapes ---------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_each_model_learns_its_tiny_task(name):
    model, batch, before, losses = trained(name)
    assert all(torch.isfinite(torch.tensor(losses)))
    with torch.no_grad():
        after = mean_loss(model, batch)
    assert after < 0.5 * before, f"{name}: loss {before:.3f} -> {after:.3f} after {STEPS} steps"
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])


def test_output_shapes():
    with torch.no_grad():
        model, b = one_to_one()
        assert model(b["x"]).shape == (16, 4)
        for make in (many_to_one_tokens, many_to_one_features):
            model, b = make()
            assert model(model.sequence(b), b["lengths"]).shape == (16, len(model.vocab["labels"]))
        model, b = many_to_many()
        assert model(b["x"], b["lengths"]).shape == (8, 10, 3)
        model, b = one_to_many()
        logits, (h, c) = model(b["tokens"])
        assert logits.shape == (12, 9, len(TOKENS)) and h.shape == c.shape == (1, 12, HIDDEN)
        for make in (seq2seq, seq2seq_plain):
            model, b = make()
            logits = model(b["src"], b["src_lengths"], b["tgt"][:, :-1], b["tgt_lengths"] - 1)
            assert logits.shape == (16, 6, len(WORDS))
        model, b = char_lm()
        logits, (h, c) = model(b["x"])
        assert logits.shape == (8, 16, len(model.vocab["chars"])) and h.shape == (1, 8, HIDDEN)


# --- variable lengths ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["many_to_one_tokens", "many_to_one_features", "many_to_one_bidirectional"])
def test_many_to_one_reads_each_sequence_at_its_own_end(name):
    model, batch = CASES[name]()
    model.eval()
    seq, lengths = model.sequence(batch), batch["lengths"]
    assert len(set(lengths.tolist())) > 2  # really mixed lengths
    with torch.no_grad():
        padded = model(seq, lengths)
        for i, n in enumerate(lengths.tolist()):
            alone = model(seq[i : i + 1, :n])  # no padding, no lengths: the plain fused pass
            torch.testing.assert_close(padded[i : i + 1], alone, atol=1e-6, rtol=1e-5)
        # whatever the padding holds, the prediction stays
        pad = beyond(lengths, seq.shape[1])
        gen = torch.Generator().manual_seed(0)
        if seq.dtype == torch.long:
            junk = seq.masked_scatter(pad, torch.randint(1, len(TOKENS), seq.shape, generator=gen)[pad])
        else:
            junk = torch.where(pad[..., None], 100 * torch.randn(seq.shape, generator=gen), seq)
        assert not torch.equal(junk, seq)
        torch.testing.assert_close(model(junk, lengths), padded, atol=1e-7, rtol=0)
        # and without lengths the padding would have changed it: the test can fail
        assert not torch.allclose(model(junk), padded, atol=1e-3)


def sample_of(batch: dict, i: int, padding: dict) -> dict:
    """Sample i alone as a batch of one, every padded array cut to its own length."""
    one = {k: v[i : i + 1] for k, v in batch.items()}
    for lengths, arrays in padding.items():
        n = int(batch[lengths][i])
        for key in arrays:
            one[key] = one[key][:, :n]
    return one


def with_junk_padding(batch: dict, padding: dict, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    junk = dict(batch)
    for lengths, arrays in padding.items():
        for key in arrays:
            a = batch[key]
            pad = beyond(batch[lengths], a.shape[1])
            if a.dtype == torch.long:
                top = int(a.max()) + 1
                junk[key] = torch.where(pad, torch.randint(1, top, a.shape, generator=gen), a)
            else:
                junk[key] = torch.where(pad[..., None], 50 * torch.randn(a.shape, generator=gen), a)
            assert not torch.equal(junk[key], a)
    return junk


@pytest.mark.parametrize("name", list(PADDING))
def test_masked_losses_ignore_padding(name):
    model, batch = CASES[name]()
    model.eval()
    padding = PADDING[name]
    with torch.no_grad():
        total, count = model.loss_terms(batch)
        # the batch's summed loss is the sum of each sample's loss computed alone, without padding
        alone = [model.loss_terms(sample_of(batch, i, padding)) for i in range(len(batch[next(iter(padding))]))]
        torch.testing.assert_close(total, sum(t for t, _ in alone), atol=1e-4, rtol=1e-5)
        assert int(count) == sum(int(c) for _, c in alone)
        # and junk in the padding changes nothing
        junk_total, junk_count = model.loss_terms(with_junk_padding(batch, padding))
        torch.testing.assert_close(junk_total, total, atol=1e-6, rtol=1e-6)
        assert int(junk_count) == int(count)
    if name.startswith("many_to_one"):
        expected = len(batch["y"])  # one prediction per sequence
    elif name.startswith("seq2seq"):
        expected = int((batch["tgt_lengths"] - 1).sum())  # <bos> w1 .. wn predicts w1 .. wn <eos>
    else:
        expected = int((batch["lengths"] - int(name == "one_to_many")).sum())  # melody: token t predicts t+1
    assert int(count) == expected


# --- decoding and sampling -------------------------------------------------------------------


def greedy_by_hand(model: OneToMany, prime: torch.Tensor, length: int) -> list[list[int]]:
    """Argmax decoding, re-reading the whole prefix at every step (no carried state)."""
    seq = prime
    with torch.no_grad():
        for _ in range(length):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, prime.shape[1] :].tolist()


def cut(row: list[int], stop: int) -> list[int]:
    return row[: row.index(stop)] if stop in row else row


def test_one_to_many_greedy_is_argmax_step_by_step():
    model, batch, _, _ = trained("one_to_many")
    prime = torch.tensor([[2], [4], [7]])
    hand = greedy_by_hand(model, prime, 12)
    assert model.generate(prime, 12, temperature=0, stop_token=None) == hand
    assert model.generate(prime, 12, temperature=0) == [cut(row, MELODY_EOS) for row in hand]
    # the trained model climbs the scale from its seed
    assert hand[0][:3] == [3, 4, 5]
    # temperature -> 0 samples the argmax; so does top_k=1 at any temperature
    gen = torch.Generator().manual_seed(1)
    assert model.generate(prime, 12, temperature=1e-4, stop_token=None, generator=gen) == hand
    assert model.generate(prime, 12, temperature=1.5, top_k=1, stop_token=None, generator=gen) == hand


def char_greedy(model: CharLM, prime: str, length: int) -> str:
    ids = torch.tensor([model.encode(prime)])
    return prime + model.decode(greedy_by_hand(model, ids, length)[0])


@pytest.mark.parametrize("name", ["char_lm", "untrained"])
def test_char_lm_sampling(name):
    model = trained("char_lm")[0] if name == "char_lm" else char_lm()[0].eval()
    prime, n = "the c", 25
    greedy = char_greedy(model, prime, n)
    assert model.sample(prime, n, temperature=0) == greedy
    assert model.sample(prime, n, temperature=1e-4, seed=3) == greedy
    assert model.sample(prime, n, temperature=1.0, top_k=1, seed=3) == greedy
    if name == "char_lm":
        assert greedy.startswith("the cat sat on the mat.")  # it learned the text
    # prime kept, exact length, seeded samples reproducible, different seeds differ
    samples = [model.sample(prime, n, temperature=1.0, seed=s) for s in range(4)]
    for s, text in enumerate(samples):
        assert text.startswith(prime) and len(text) == len(prime) + n
        assert set(text) <= set(model.vocab["chars"])
        assert model.sample(prime, n, temperature=1.0, seed=s) == text
    if name == "untrained":
        assert len(set(samples)) > 1


def test_char_lm_top_k_stays_in_the_top_k():
    model = char_lm()[0].eval()
    prime, n = "the", 20
    text = model.sample(prime, n, temperature=2.0, top_k=2, seed=0)
    ids = torch.tensor([model.encode(text)])
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    top2 = logits[0].topk(2, dim=-1).indices  # after position t: the two allowed next characters
    for t in range(len(prime) - 1, len(text) - 1):
        assert int(ids[0, t + 1]) in top2[t].tolist()
    assert model.sample(prime, n, temperature=2.0, top_k=2, seed=0) == text


def test_char_lm_rejects_unknown_characters_and_empty_prime():
    model = char_lm()[0]
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        model.sample("Z", 3)
    with pytest.raises(ValueError, match="at least one"):
        model.sample("", 3)


def sequence_logprob(model: Seq2Seq, src, n: int, tokens: list[int], max_len: int) -> float:
    """Summed log-prob of a decoded row: tokens, then <eos> if decoding stopped before max_len."""
    finished = len(tokens) < max_len
    targets = tokens + [EOS] if finished else tokens
    tgt_in = torch.tensor([[BOS, *targets[:-1]]])
    with torch.no_grad():
        logits = model(src[None, :n], torch.tensor([n]), tgt_in)
    return float(F.log_softmax(logits[0], -1).gather(1, torch.tensor(targets)[:, None]).sum())


@pytest.mark.parametrize("name", ["seq2seq", "seq2seq_plain", "seq2seq_bidirectional", "seq2seq_bidirectional_plain"])
@pytest.mark.parametrize("fit", [True, False])
def test_beam_search_against_greedy(name, fit):
    model = trained(name)[0] if fit else CASES[name]()[0].eval()
    batch = CASES[name]()[1]
    src, lengths, max_len = batch["src"], batch["src_lengths"], 8
    greedy = model.greedy(src, lengths, max_len=max_len)
    assert len(greedy) == len(src)
    assert model.beam_search(src, lengths, beam=1, max_len=max_len) == greedy
    wide = model.beam_search(src, lengths, beam=4, max_len=max_len)
    for i, n in enumerate(lengths.tolist()):
        g = sequence_logprob(model, src[i], n, greedy[i], max_len)
        b = sequence_logprob(model, src[i], n, wide[i], max_len)
        assert b >= g - 1e-5, f"source {i}: beam 4 scored {b:.4f} < greedy {g:.4f}"
    if fit:  # it learned to reverse
        expected = [src[i, :n].flip(0).tolist() for i, n in enumerate(lengths.tolist())]
        assert sum(w == e for w, e in zip(wide, expected)) >= len(expected) // 2


# --- gate traces -----------------------------------------------------------------------------


def traced_steps(name: str, batch: dict) -> torch.Tensor:
    """The true number of steps the traced core reads, per sample."""
    if name == "one_to_one":
        return torch.ones(len(batch["y"]), dtype=torch.long)
    if name == "one_to_many":
        return (batch["lengths"] - 1).clamp(min=1)
    if name.startswith("seq2seq"):
        return batch["tgt_lengths"] - 1
    if name == "char_lm":
        return torch.full((len(batch["x"]),), batch["x"].shape[1])
    return batch["lengths"]


@pytest.mark.parametrize("name", CASES)
def test_trace_matches_the_batch(name):
    model, batch = CASES[name]()
    model.eval()
    trace = model.trace(batch)
    assert isinstance(trace, GateTrace)
    steps = traced_steps(name, batch)
    B, T = len(steps), int(steps.max())
    L = model.model_cfg.num_layers * (2 if model.lstm.bidirectional else 1)  # h_n's layout
    assert trace.mask.shape == (B, T)
    assert trace.mask.sum(1).tolist() == steps.tolist()
    names = [n for n, _ in trace.items()]
    assert names == ["input_gate", "forget_gate", "candidate", "output_gate", "cell", "hidden"]
    for n, value in trace.items():
        assert value.shape == (L, B, T, HIDDEN), n
        assert torch.isfinite(value[:, trace.mask]).all(), n
        assert torch.isnan(value[:, ~trace.mask]).all(), n
    assert trace.reconstruction_error < 1e-5


# --- the NaN guard ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_non_finite_loss_raises_one_line(name):
    model, batch = CASES[name]()
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last_linear.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError) as err:
        model.training_step(batch, 0)
    assert isinstance(err.value, PipelineError)  # the CLI prints it as one `error:` line
    message = str(err.value)
    assert "\n" not in message and "train_loss is nan" in message and "lr" in message
