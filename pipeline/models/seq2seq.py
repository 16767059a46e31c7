"""seq2seq: a GateLSTM encoder reads the source; a GateLSTM decoder writes the target.

The decoder starts from the encoder's final state and, with `attention` (Luong et al. 2015,
dot score), looks back at every encoder state at each step. Training uses teacher forcing;
decoding is greedy or beam search.

With `bidirectional`, the encoder reads the source both ways; the decoder stays unidirectional
(it writes left to right). A linear bridge maps each layer's two final states to the decoder's
initial state (h0 = tanh(W_h [h_fwd; h_bwd]), c0 = W_c [c_fwd; c_bwd]; Bahdanau et al. 2015
initialise from the backward state, OpenNMT's `bridge` learns such a layer), and a linear map
brings the 2 x hidden encoder states to the decoder's width for attention.

Batches: pipeline.batch.Seq2SeqBatch. Serving: texts (column `text`) -> text, translation, unknown_share;
texts are tokenised as the prepared data were (pipeline.text).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import serving_inputs as inputs
from pipeline.batch import BOS, EOS, lengths_mask
from pipeline.models import evaluation, serving
from pipeline.models.base import RecurrentModule, core, masked_cross_entropy, token_embedding
from pipeline.models.randomness import SampleDropout
from pipeline.topologies import Topology


class Seq2Seq(RecurrentModule):
    def __init__(self, vocab: dict, dims: dict, model: dict, train: dict):
        super().__init__(vocab, dims, model, train)
        cfg = self.model_cfg
        self.src_embed = token_embedding(len(vocab["src_tokens"]), cfg)
        self.tgt_embed = token_embedding(len(vocab["tgt_tokens"]), cfg)
        self.encoder = core(cfg.embedding_dim, cfg, bidirectional=cfg.bidirectional)
        self.decoder = core(cfg.embedding_dim, cfg)
        H = cfg.hidden_size
        if cfg.bidirectional:  # both directions' final states -> the decoder's initial state; memory -> H wide
            self.bridge_h, self.bridge_c = nn.Linear(2 * H, H), nn.Linear(2 * H, H)
            self.bridge_memory = nn.Linear(2 * H, H, bias=False) if cfg.attention else None
        # attention: combine the decoder state with its context vector (Luong's "attentional hidden state")
        self.combine = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size) if cfg.attention else None
        self.dropout = SampleDropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_size, len(vocab["tgt_tokens"]))

    @property
    def lstm(self):  # the core evaluation traces (the decoder writes the words)
        return self.decoder

    def encode(self, src: Tensor, src_lengths: Tensor):
        memory, state = self.encoder(self.src_embed(src), lengths=src_lengths)
        if self.encoder.bidirectional:
            state = self.bridge(state)
            if self.bridge_memory is not None:
                memory = self.bridge_memory(memory)
        src_mask = lengths_mask(src_lengths, src.shape[1])
        return memory, state, src_mask

    def bridge(self, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """(2 L, B, H) encoder states, entry 2k + d for layer k and direction d -> (L, B, H) decoder states."""
        h, c = (s.view(-1, 2, *s.shape[1:]) for s in state)  # (L, 2, B, H)
        both = lambda s: torch.cat([s[:, 0], s[:, 1]], dim=-1)  # noqa: E731  (L, B, 2H)
        return torch.tanh(self.bridge_h(both(h))), self.bridge_c(both(c))

    def decode_steps(self, tgt_in: Tensor, state, memory: Tensor, src_mask: Tensor, lengths=None):
        """Logits (B, T, V) for decoder inputs tgt_in, and the decoder state."""
        out, state = self.decoder(self.tgt_embed(tgt_in), state, lengths=lengths)
        if self.combine is not None:
            scores = out @ memory.transpose(1, 2)  # (B, T, S) dot-product attention
            scores = scores.masked_fill(~src_mask[:, None, :], float("-inf"))
            context = F.softmax(scores, dim=-1) @ memory
            out = torch.tanh(self.combine(torch.cat([out, context], dim=-1)))
        return self.out(self.dropout(out)), state

    def forward(self, src, src_lengths, tgt_in, tgt_lengths=None):
        memory, state, src_mask = self.encode(src, src_lengths)
        return self.decode_steps(tgt_in, state, memory, src_mask, tgt_lengths)[0]

    def loss_terms(self, batch):
        tgt = batch["tgt"]
        in_lengths = batch["tgt_lengths"] - 1  # <bos> w1 .. wn predicts w1 .. wn <eos>
        logits = self(batch["src"], batch["src_lengths"], tgt[:, :-1], in_lengths)
        mask = lengths_mask(in_lengths, tgt.shape[1] - 1)
        return masked_cross_entropy(logits, tgt[:, 1:], mask)

    def trace(self, batch):
        _, state, _ = self.encode(batch["src"], batch["src_lengths"])
        in_lengths = batch["tgt_lengths"] - 1
        return self.decoder(self.tgt_embed(batch["tgt"][:, :-1]), state, lengths=in_lengths, return_gates=True)[2]

    @torch.no_grad()
    def greedy(self, src: Tensor, src_lengths: Tensor, max_len: int = 40) -> list[list[int]]:
        memory, state, src_mask = self.encode(src, src_lengths)
        token = torch.full((src.shape[0], 1), BOS, dtype=torch.long, device=src.device)
        steps, done = [], torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            logits, state = self.decode_steps(token, state, memory, src_mask)
            token = logits[:, -1].argmax(-1, keepdim=True)
            steps.append(token[:, 0])
            done |= token[:, 0] == EOS
            if bool(done.all()):
                break
        rows = torch.stack(steps, 1).tolist()
        return [row[: row.index(EOS)] if EOS in row else row for row in rows]

    @torch.no_grad()
    def beam_search(self, src: Tensor, src_lengths: Tensor, beam: int = 4, max_len: int = 40) -> list[list[int]]:
        """Beam search, one source at a time (beams as the batch); scores are summed log-probs."""
        results = []
        for b in range(src.shape[0]):
            n = int(src_lengths[b])
            memory, (h, c), src_mask = self.encode(src[b : b + 1, :n], src_lengths[b : b + 1])
            hyps = [([], 0.0)]  # (tokens, score) of live hypotheses
            state = (h, c)
            finished = []
            for _ in range(max_len):
                k = len(hyps)
                last = torch.tensor([[toks[-1] if toks else BOS] for toks, _ in hyps], device=src.device)
                logits, (h, c) = self.decode_steps(last, state, memory.expand(k, -1, -1), src_mask.expand(k, -1))
                logp = F.log_softmax(logits[:, -1], -1)
                total = torch.tensor([s for _, s in hyps], device=src.device)[:, None] + logp
                top = torch.topk(total.flatten(), min(beam, total.numel()))
                new_hyps, keep = [], []
                for score, flat in zip(top.values.tolist(), top.indices.tolist()):
                    parent, token = divmod(flat, logp.shape[1])
                    if token == EOS:
                        finished.append((hyps[parent][0], score))
                    else:
                        new_hyps.append((hyps[parent][0] + [token], score))
                        keep.append(parent)
                # scores only fall as hypotheses grow: stop once the best finished one beats every live one
                if not new_hyps or (len(finished) >= beam and max(sc for _, sc in finished) >= new_hyps[0][1]):
                    break
                hyps = new_hyps
                idx = torch.tensor(keep, device=src.device)
                state = (h.index_select(1, idx), c.index_select(1, idx))
            pool = finished or hyps
            results.append(max(pool, key=lambda hs: hs[1])[0])
        return results


class Seq2SeqTopology(Topology):
    name = "seq2seq"
    model_class = Seq2Seq
    key_metric = "exact_match"

    def settings(self, inputs: str) -> frozenset[str]:
        return frozenset({"model.embedding_dim", "model.attention", "model.bidirectional"})

    def evaluate(self, model, dm, split, plots, samples):
        """Exact match of greedy decodes, and corpus BLEU (torchmetrics) on word tokens."""
        from torchmetrics.text import BLEUScore

        from pipeline.text import tokenizer, translation_tokenize

        tokenize, detokenize = tokenizer(dm.vocab)
        src_words, tgt_words = dm.vocab["src_tokens"], dm.vocab["tgt_tokens"]
        hyps, refs, rows = [], [], []
        for batch in evaluation.batches(dm, split):
            for src, n, out_ids, tgt, m in zip(batch["src"], batch["src_lengths"], model.greedy(
                    batch["src"], batch["src_lengths"]), batch["tgt"], batch["tgt_lengths"]):
                hyp = detokenize([tgt_words[i] for i in out_ids])
                ref = detokenize([tgt_words[i] for i in tgt[1 : int(m) - 1].tolist()])
                hyps.append(hyp)
                refs.append(ref)
                rows.append((detokenize([src_words[i] for i in src[: int(n)].tolist()]), ref, hyp))
        exact = float(np.mean([h == r for h, r in zip(hyps, refs)]))
        bleu = BLEUScore(n_gram=4)
        if tokenize is translation_tokenize:  # words: hyphens as words, as tokenized
            tok = lambda s: " ".join(s.replace("-", " - ").split())  # noqa: E731
        else:  # BLEU over the tokenizer's own units (characters)
            tok = lambda s: " ".join(tokenize(s))  # noqa: E731
        score = float(bleu([tok(h) for h in hyps], [[tok(r)] for r in refs]))
        lines = ["source\treference\tmodel\tmatch"] + [f"{s}\t{r}\t{h}\t{r == h}" for s, r, h in rows[:200]]
        (samples / "translations.tsv").write_text("\n".join(lines) + "\n")
        train = dm.split("train")
        common = Counter(tuple(row[: int(m)].tolist()) for row, m in zip(train["tgt"], train["tgt_lengths"]))
        top = detokenize([tgt_words[i] for i in common.most_common(1)[0][0][1:-1]])
        baseline = {"name": "most frequent training translation",
                    "exact_match": float(np.mean([r == top for r in refs]))}
        return {"exact_match": exact, "bleu": score}, baseline

    def input_example(self, info, source_example):
        if source_example is not None:
            return source_example
        return pd.DataFrame({"text": ["three hundred and forty-two", "seven"]})

    def predict(self, pyfunc, model_input):
        """Empty text -> ""; a text of unknown words only -> translation None (nothing to translate from)."""
        from pipeline.batch import UNK_TOKEN
        from pipeline.text import encode_source, tokenizer

        detokenize = tokenizer(pyfunc.vocab)[1]
        texts = inputs.texts(model_input)
        unk = pyfunc.vocab["src_tokens"].index(UNK_TOKEN)
        ids = [encode_source(t, pyfunc.vocab) for t in texts]
        shares = [serving.unknown_share(s, unk) for s in ids]
        translations: list[str | None] = ["" if not s else None for s in ids]
        answer = [i for i, (s, share) in enumerate(zip(ids, shares)) if s and share < 1]
        if answer:
            out = pyfunc.model.greedy(*serving.padded([ids[i] for i in answer]))
            words = pyfunc.vocab["tgt_tokens"]
            for i, row in zip(answer, out):
                translations[i] = detokenize([words[t] for t in row])
        return pd.DataFrame({"text": pd.Series(texts, dtype=object), "translation": pd.Series(translations,
                             dtype=object), "unknown_share": pd.Series(shares, dtype=np.float64)})

    def cli_input(self, pyfunc, names, options):
        serving.no_options(pyfunc.info["task"], options)
        return pd.DataFrame({"text": names})


TOPOLOGY = Seq2SeqTopology()
