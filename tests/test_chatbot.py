"""chatbot: the Chit Chat Challenge builder, the reply decoder and metrics, and a tiny model that learns (seconds)."""

from __future__ import annotations

import importlib.util
import math
from functools import cache

import numpy as np
import pytest
import torch

from pipeline.config import PipelineError
from pipeline.datasets import chatbot
from pipeline.datasets.chatbot import ChatbotData
from pipeline.datasets.prepared import SPLITS, save_prepared
from pipeline.models.dialogue import converse, distinct_n, greedy_replies, unigram_nll
from pipeline.text import detokenize

SMALL = ChatbotData(max_pairs=600, max_vocab=300, max_message_tokens=12, max_reply_tokens=10)
SEED = 7


@cache
def built(seed: int = SEED, cfg: ChatbotData = SMALL):
    return chatbot.build(cfg, seed)


@cache
def conversations():
    return chatbot.read_conversations()


def test_conversations_match_the_package_reader():
    """Our file reader against chitchat_dataset's own ConversationDataset (turns joined with spaces)."""
    from chitchat_dataset import ConversationDataset

    ours = conversations()
    theirs = [list(conv) for conv in ConversationDataset()]
    assert len(ours) == len(theirs) == 7168
    assert sum(map(len, ours)) == 138_737  # turns; 258,145 messages joined per speaker turn
    normalise = lambda conv: tuple(" ".join(turn.split()) for turn in conv)  # noqa: E731
    assert sorted(map(normalise, ours)) == sorted(map(normalise, theirs))


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    first = save_prepared(built(), tmp_path / "a")
    second = save_prepared(chatbot.build(SMALL, SEED), tmp_path / "b")
    assert first["content_sha256"] == second["content_sha256"]
    for name in ("train.npz", "val.npz", "test.npz", "vocab.json", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert save_prepared(built(SEED + 1), tmp_path / "c")["content_sha256"] != first["content_sha256"]
    assert first["source"]["package"] == "chitchat-dataset" and first["source"]["version"] == "0.9.0"
    assert "MIT" in first["source"]["license"]


def test_splits_hold_whole_conversations():
    data = built()
    held = {s: set(a["conversation"].tolist()) for s, a in data.splits.items()}
    assert not held["train"] & held["val"] and not held["train"] & held["test"] and not held["val"] & held["test"]
    assert {s: len(a["src"]) for s, a in data.splits.items()} == {"train": 480, "val": 60, "test": 60}
    assert data.stats["conversations"] == {s: len(c) for s, c in held.items()}


def test_shapes_padding_and_specials():
    data = built()
    tokens = data.vocab["tgt_tokens"]
    assert tokens[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"] and data.vocab["src_tokens"] == tokens
    assert len(tokens) <= SMALL.max_vocab
    for split in SPLITS:
        a = data.splits[split]
        src, n_src, tgt, n_tgt = a["src"], a["src_lengths"], a["tgt"], a["tgt_lengths"]
        assert src.dtype == tgt.dtype == np.int64 and src.ndim == tgt.ndim == 2
        assert src.shape[1] == n_src.max() <= SMALL.max_message_tokens and n_src.min() >= 1
        assert tgt.shape[1] == n_tgt.max() <= SMALL.max_reply_tokens + 2 and n_tgt.min() >= 3
        rows = np.arange(len(tgt))
        assert (tgt[:, 0] == 2).all() and (tgt[rows, n_tgt - 1] == 3).all()
        for padded, lengths in ((src, n_src), (tgt, n_tgt)):
            beyond = np.arange(padded.shape[1])[None, :] >= lengths[:, None]
            assert not padded[beyond].any() and (padded[~beyond] > 0).all()
            assert padded.max() < len(tokens)
        inner = tgt[:, 1:][np.arange(tgt.shape[1] - 1)[None, :] < (n_tgt - 2)[:, None]]
        assert not np.isin(inner, [0, 2, 3]).any()  # <bos>/<eos> only at the ends


def test_vocabulary_comes_from_training_pairs_only():
    data = built()
    train = data.splits["train"]
    seen = set(np.unique(np.concatenate([train["src"].ravel(), train["tgt"].ravel()])).tolist())
    assert set(range(4, len(data.vocab["tgt_tokens"]))) <= seen  # every word of the vocab occurs in training


def test_pairs_are_consecutive_turns_of_their_conversation():
    data = built()
    tokens = data.vocab["tgt_tokens"]
    a = data.splits["val"]
    for i in range(10):
        turns = [chatbot.tokenize(t) for t in conversations()[a["conversation"][i]]]
        reply = [tokens[t] for t in a["tgt"][i, 1 : a["tgt_lengths"][i] - 1]]
        message = [tokens[t] for t in a["src"][i, : a["src_lengths"][i]]]
        known = lambda words: [w if w in tokens else "<unk>" for w in words]  # noqa: E731
        assert any(known(r) == reply and known(m[-SMALL.max_message_tokens :]) == message
                   for m, r in zip(turns, turns[1:]))


def test_tokenize_detokenize_and_encode():
    assert chatbot.tokenize("I'm fine, thanks!  :)") == ["i'm", "fine", ",", "thanks", "!", ":", ")"]
    assert detokenize(["i'm", "fine", ",", "thanks", "!"]) == "i'm fine, thanks!"
    vocab = {"tgt_tokens": ["<pad>", "<unk>", "<bos>", "<eos>", "hi", "there"]}
    assert chatbot.encode_message("Hi there, you", vocab) == [4, 5, 1, 1]
    assert chatbot.encode_message("hi there you", vocab, max_tokens=2) == [5, 1]
    assert chatbot.encode_message("   ", vocab) == []


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "chitchat_dataset"
                        else real(name, *a))
    with pytest.raises(PipelineError, match="not installed: pip install chitchat-dataset==0.9.0"):
        chatbot.build(SMALL, SEED)


# --- metrics and decoding ------------------------------------------------------------------------


def test_distinct_n_by_hand():
    replies = [["i", "am", "fine"], ["i", "am", "tired"], ["i"]]
    assert distinct_n(replies, 1) == pytest.approx(4 / 7)
    assert distinct_n(replies, 2) == pytest.approx(3 / 4)  # (i am) twice, (am fine), (am tired)
    assert distinct_n([["same"]] * 5, 2) == 0.0 and distinct_n([["same"]] * 4, 1) == 0.25


def test_unigram_nll_by_hand():
    # counts 3, 1 (+1 smoothing: 4, 2 of 6) -> test ids [0, 1]: -(log 4/6 + log 2/6) / 2
    assert unigram_nll(np.array([0, 0, 0, 1]), np.array([0, 1]), 2) == pytest.approx(
        -(math.log(4 / 6) + math.log(2 / 6)) / 2)


def _model(tokens, seed=0, hidden=32):
    from pipeline.models.seq2seq import Seq2Seq

    torch.manual_seed(seed)
    return Seq2Seq(vocab={"src_tokens": tokens, "tgt_tokens": tokens}, dims={},
                   model={"hidden_size": hidden, "embedding_dim": 16}, train={"lr": 0.01, "batch_size": 32})


def test_greedy_replies_equal_the_models_greedy_without_a_ban_and_respect_it():
    tokens = built().vocab["tgt_tokens"]
    model = _model(tokens).eval()
    a = built().splits["test"]
    src, n = torch.from_numpy(a["src"][:16]), torch.from_numpy(a["src_lengths"][:16])
    src = src[:, : int(n.max())]
    assert greedy_replies(model, src, n, (), 2, 3, max_len=12) == model.greedy(src, n, max_len=12)
    with torch.no_grad():  # make <unk> the likeliest token everywhere: the ban must still keep it out
        model.out.bias[1] = 50.0
    banned = greedy_replies(model, src, n, (0, 1, 2), 2, 3, max_len=12)
    assert all(1 not in r and 0 not in r and 2 not in r for r in banned)
    assert all(r == [1] * 12 for r in model.greedy(src, n, max_len=12))
    with torch.no_grad():  # now the likeliest word everywhere is word 7: trigram blocking must break the loop
        model.out.bias[1], model.out.bias[7] = 0.0, 50.0
    assert all(r == [7] * 12 for r in greedy_replies(model, src, n, (0, 1, 2), 2, 3, max_len=12))
    for reply in greedy_replies(model, src, n, (0, 1, 2), 2, 3, max_len=12, block_ngram=3):
        assert reply[:3] == [7, 7, 7] and reply[3] != 7  # (7, 7, 7) once
        trigrams = [tuple(reply[i : i + 3]) for i in range(len(reply) - 2)]
        assert len(trigrams) == len(set(trigrams))


def test_blocked_tokens_by_hand():
    from pipeline.models.dialogue import blocked

    assert blocked([5, 6, 7, 5, 6], 3) == [7]  # (5, 6) seen before, followed by 7
    assert blocked([5, 6, 7, 5, 6, 8, 5, 6], 3) == [7, 8]
    assert blocked([5, 6], 3) == [] and blocked([4, 4], 2) == [4] and blocked([], 3) == []


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("chatbot")
    save_prepared(built(), out)
    return out


def test_a_tiny_model_learns_and_the_evaluator_reports(prepared, tmp_path):
    """A few seconds of training beat the unigram baseline on held-out replies; the evaluator's numbers agree
    with their definitions."""
    from pipeline.datasets.datamodule import PreparedDataModule

    dm = PreparedDataModule(prepared, 32, SEED)
    tokens = dm.vocab["tgt_tokens"]
    model = _model(tokens)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(4):
        for batch in dm.loader("train", shuffle=True, drop_last=True, epoch_of=lambda e=epoch: e):
            total, count = model.loss_terms(batch)
            optimizer.zero_grad()
            (total / count).backward()
            optimizer.step()
    model.eval()
    out, samples = tmp_path / "plots", tmp_path / "samples"
    out.mkdir()
    samples.mkdir()
    with torch.no_grad():
        metrics, baseline = converse(model, dm, "test", out, samples)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["nll"]))
    assert metrics["perplexity"] < baseline["perplexity"]  # learned something beyond word frequencies
    assert 0 < metrics["distinct_1"] <= 1 and 0 <= metrics["distinct_2"] <= 1
    test = dm.split("test")
    targets = np.concatenate([r[1:n] for r, n in zip(test["tgt"], test["tgt_lengths"])])
    assert baseline["nll"] == pytest.approx(unigram_nll(
        np.concatenate([r[1:n] for r, n in zip(dm.split("train")["tgt"], dm.split("train")["tgt_lengths"])]),
        targets, len(tokens)))
    lines = (samples / "dialogues.tsv").read_text().splitlines()
    assert lines[0] == "message\treference reply\tmodel reply" and len(lines) == 1 + len(test["src"])
    assert all(len(line.split("\t")) == 3 for line in lines)
    assert "<unk>" not in "".join(line.split("\t")[2] for line in lines[1:])
    assert all(len(chatbot.tokenize(line.split("\t")[2])) <= SMALL.max_reply_tokens for line in lines[1:])
    assert len((samples / "prompts.tsv").read_text().splitlines()) == 7


def test_answer_takes_messages_as_text():
    from pipeline.models.dialogue import answer, reply_to

    vocab = built().vocab
    tokens = vocab["tgt_tokens"]
    model = _model(tokens, seed=1).eval()
    long = " ".join(["well"] * 30 + ["do", "you", "like", "dogs", "?"])
    out = answer(model, vocab, ["Do you like dogs?", "", "zzqx", long])
    assert list(out.columns) == ["message", "reply", "unknown_share"] and len(out) == 4
    expected = reply_to(model, [chatbot.encode_message("do you like dogs ?", vocab)], vocab)[0]
    assert out["reply"][0] == detokenize([tokens[i] for i in expected])
    assert out["reply"][1] is None and out["unknown_share"][1] == 0.0  # nothing to answer
    assert out["unknown_share"][2] == 1.0 and isinstance(out["reply"][2], str)
    cut = " ".join(chatbot.tokenize(long)[-SMALL.max_message_tokens :])
    assert out["reply"][3] == answer(model, vocab, [cut])["reply"][0]  # cut to its last tokens, as in training


def test_the_task_is_a_seq2seq_chatbot_judged_by_perplexity():
    from pipeline.models.dialogue import CHATBOT
    from pipeline.models.seq2seq import Seq2Seq, Seq2SeqTopology
    from pipeline.tasks import get_task

    task = get_task("chatbot")
    assert task.topology is CHATBOT and isinstance(CHATBOT, Seq2SeqTopology) and task.model_class is Seq2Seq
    assert task.key_metric == "perplexity" and not task.higher_is_better and task.eval_split == "test"
    assert task.uses == {"model.embedding_dim", "model.attention", "model.bidirectional"}


def test_the_package_is_read_not_imported():
    import subprocess
    import sys

    code = ("import sys; from pipeline.datasets import chatbot; chatbot.read_conversations(); import pipeline.prepare;"
            "bad = {'chitchat_dataset', 'torch', 'lightning'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
