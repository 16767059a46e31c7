"""The chatbot: the seq2seq topology with a dialogue's evaluation and serving (`CHATBOT`, the VARIANT that
pipeline/datasets/chatbot.py declares). The model, its training and its batches are the seq2seq ones.

Evaluation: perplexity of held-out replies, distinct-n of generated replies, dialogues.

Metrics the field uses for open-domain dialogue models:

- perplexity: exp of the mean negative log-likelihood per reply token (every word and the final
  <eos>, given the message and the reference reply so far: teacher forcing), over the replies of
  held-out conversations; the vocabulary's <unk> counts as one word, as in the baseline.
- distinct-1 / distinct-2 (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
  Conversation Models"): distinct n-grams over all n-grams of the generated replies of the split.
  A model that answers everything with "i don't know" scores near 0.

Baselines on the same vocabulary and split: a unigram model of the training replies (add-one
smoothed) for perplexity; the most frequent training reply without <unk>, given to every message, for
distinct-n. Replies are decoded greedily with <unk> (and <pad>, <bos>) never chosen and no word trigram
repeated within a reply (BlenderBot's 3-gram blocking, Roller et al. 2021; `no_repeat_ngram_size` in
Hugging Face's generate): a small model's greedy reply otherwise loops ("of the the the the ...").

Serving: column `message` (a string) -> message, reply (None for a message without any word), unknown_share.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import serving_inputs as inputs
from pipeline.batch import BOS, EOS, PAD, UNK
from pipeline.models import serving
from pipeline.models.seq2seq import Seq2SeqTopology
from pipeline.text import detokenize

BATCH = 256
MAX_REPLY = 20  # tokens generated at most per reply when the vocab does not say (its max_reply_tokens)
BLOCK_NGRAM = 3  # no n-gram of this size twice in one reply
PROMPTS = ("hi! how are you?", "what do you do for fun?", "do you have any pets?", "what is your favorite movie?",
           "i just got back from a trip to hawaii.", "i'm so tired today.")


def distinct_n(replies: list[list[str]], n: int) -> float:
    """Distinct n-grams / all n-grams over every reply (0.0 when there is no n-gram at all)."""
    grams = [tuple(r[i : i + n]) for r in replies for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unigram_nll(train_ids: np.ndarray, test_ids: np.ndarray, vocab_size: int) -> float:
    """Mean negative log-likelihood (nats) of test_ids under the add-one smoothed unigram model of train_ids."""
    counts = np.bincount(train_ids, minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[test_ids].mean())


def reply_ids(arrays: dict) -> np.ndarray:
    """Every predicted position of the replies: the tokens after <bos>, up to and with <eos>."""
    return np.concatenate([row[1:n] for row, n in zip(arrays["tgt"], arrays["tgt_lengths"])])


def blocked(reply: list[int], n: int) -> list[int]:
    """The tokens that would complete an n-gram already in `reply` (its last n-1 tokens seen before)."""
    if n < 1 or len(reply) < n - 1:
        return []
    if n == 1:
        return list(reply)
    prefix = reply[len(reply) - n + 1 :]
    return [reply[i + n - 1] for i in range(len(reply) - n + 1) if reply[i : i + n - 1] == prefix]


@torch.no_grad()
def greedy_replies(model, src: torch.Tensor, src_lengths: torch.Tensor, banned: tuple[int, ...],
                   bos: int, eos: int, max_len: int = MAX_REPLY, block_ngram: int = 0) -> list[list[int]]:
    """Greedy decoding with `banned` token ids never chosen and, with block_ngram n > 0, no n-gram twice in a
    reply: (B, S) messages -> B lists of reply ids (no <eos>).

    Uses the seq2seq model's `encode` and `decode_steps`; the same steps as its `greedy`, plus the constraints."""
    memory, state, src_mask = model.encode(src, src_lengths)
    token = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
    steps, done = [], torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        logits, state = model.decode_steps(token, state, memory, src_mask)
        logits = logits[:, -1]
        logits[:, list(banned)] = float("-inf")
        if block_ngram and steps:
            so_far = torch.stack(steps, 1).tolist()
            for b, reply in enumerate(so_far):
                logits[b, blocked(reply, block_ngram)] = float("-inf")
        token = logits.argmax(-1, keepdim=True)
        steps.append(token[:, 0])
        done |= token[:, 0] == eos
        if bool(done.all()):
            break
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(src.shape[0])]
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def reply_to(model, messages: list[list[int]], vocab: dict) -> list[list[int]]:
    """Greedy replies (ids; <unk> banned, trigrams blocked, at most the vocab's max_reply_tokens) to messages
    given as id lists (each non-empty)."""
    max_len = vocab.get("max_reply_tokens", MAX_REPLY)
    out = []
    for start in range(0, len(messages), BATCH):
        chunk = messages[start : start + BATCH]
        src = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
        for row, ids in zip(src, chunk):
            row[: len(ids)] = torch.tensor(ids)
        lengths = torch.tensor([len(ids) for ids in chunk])
        out += greedy_replies(model, src, lengths, (PAD, UNK, BOS), BOS, EOS, max_len, BLOCK_NGRAM)
    return out


def converse(model, dm, split: str, out: Path, samples: Path) -> tuple[dict, dict]:
    """The chatbot evaluator: (metrics, baseline); writes samples/dialogues.tsv and samples/prompts.tsv."""
    from pipeline.datasets.chatbot import encode_message

    tokens = dm.vocab["tgt_tokens"]
    test, train = dm.split(split), dm.split("train")
    total, count = 0.0, 0
    for batch in dm.loader(split, batch_size=BATCH):
        s, n = model.loss_terms(batch)
        total, count = total + float(s), count + int(n)
    nll = total / count
    messages = [row[:n].tolist() for row, n in zip(test["src"], test["src_lengths"])]
    generated = [[tokens[i] for i in ids] for ids in reply_to(model, messages, dm.vocab)]
    references = [[tokens[i] for i in row[1 : n - 1]] for row, n in zip(test["tgt"], test["tgt_lengths"])]
    lines = ["message\treference reply\tmodel reply"]
    for ids, ref, hyp in list(zip(messages, references, generated))[:200]:
        lines.append("\t".join(detokenize(x) for x in ([tokens[i] for i in ids], ref, hyp)))
    (samples / "dialogues.tsv").write_text("\n".join(lines) + "\n")
    prompt_ids = [encode_message(p, dm.vocab) or [1] for p in PROMPTS]
    answers = reply_to(model, prompt_ids, dm.vocab)
    (samples / "prompts.tsv").write_text("message\tmodel reply\n" + "".join(
        f"{p}\t{detokenize([tokens[i] for i in a])}\n" for p, a in zip(PROMPTS, answers)))
    common = Counter(tuple(row[1 : n - 1].tolist()) for row, n in zip(train["tgt"], train["tgt_lengths"]))
    top = [tokens[i] for i in next(reply for reply, _ in common.most_common() if UNK not in reply)]
    base_nll = unigram_nll(reply_ids(train), reply_ids(test), len(tokens))
    metrics = {"perplexity": math.exp(nll), "nll": nll,
               "distinct_1": distinct_n(generated, 1), "distinct_2": distinct_n(generated, 2),
               "reference_distinct_1": distinct_n(references, 1), "reference_distinct_2": distinct_n(references, 2),
               "reply_length": float(np.mean([len(r) for r in generated])),
               "distinct_replies": len({tuple(r) for r in generated}) / max(1, len(generated))}
    baseline = {"name": f"unigram training replies (perplexity); the most frequent training reply "
                        f"{' '.join(top)!r} to every message (distinct-n)",
                "perplexity": math.exp(base_nll), "nll": base_nll,
                "distinct_1": distinct_n([top] * len(references), 1),
                "distinct_2": distinct_n([top] * len(references), 2)}
    return metrics, baseline



def answer(model, vocab: dict, messages: list[str]):
    """Messages -> DataFrame(message, reply, unknown_share): the greedy reply to each message (its last
    vocab["max_message_tokens"] tokens, as in training) and the share of its tokens outside the vocabulary. A message
    without any token (empty, spaces) gets reply None: there is nothing to answer."""
    from pipeline.datasets.chatbot import encode_message

    tokens = vocab["tgt_tokens"]
    ids = [encode_message(m, vocab, vocab.get("max_message_tokens")) for m in messages]
    shares = [serving.unknown_share(s, UNK) for s in ids]
    replies: list[str | None] = [None] * len(messages)
    asked = [i for i, s in enumerate(ids) if s]
    if asked:
        for i, reply in zip(asked, reply_to(model, [ids[i] for i in asked], vocab)):
            replies[i] = detokenize([tokens[t] for t in reply])
    return pd.DataFrame({"message": pd.Series(messages, dtype=object), "reply": pd.Series(replies, dtype=object),
                         "unknown_share": pd.Series(shares, dtype=np.float64)})


class ChatbotTopology(Seq2SeqTopology):
    """seq2seq as a chatbot: perplexity (lower is better) and distinct-n instead of exact match and BLEU;
    a message in, a reply out."""

    key_metric = "perplexity"
    higher_is_better = False

    def evaluate(self, model, dm, split, plots, samples):
        return converse(model, dm, split, plots, samples)

    def input_example(self, info, source_example):
        return pd.DataFrame({"message": ["hi! how are you?", "what do you do for fun?"]})

    def predict(self, pyfunc, model_input):
        frame = inputs.table(model_input, "message")
        messages = [inputs.text(v, inputs.at(i, "message")) for i, v in enumerate(frame["message"].tolist())]
        return answer(pyfunc.model, pyfunc.vocab, messages)

    def cli_input(self, pyfunc, names, options):
        serving.no_options(pyfunc.info["task"], options)
        return pd.DataFrame({"message": names})


CHATBOT = ChatbotTopology()
