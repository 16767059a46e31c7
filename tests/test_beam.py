"""Beam search (pipeline.models.beam) against references: greedy decoding at beam size 1, brute-force search
over every sequence when the beam is wide enough to hold them all, and the captioner's own greedy steps."""

import itertools

import pytest
import torch

from pipeline.models.beam import beam_search

EOS, BANNED = 1, (0,)


class MarkovDecoder:
    """A random decoder whose next-token distribution depends on the last token, the row and the step."""

    def __init__(self, vocab_size: int, rows: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.table = 2 * torch.randn(vocab_size, vocab_size, generator=g)
        self.bias = torch.randn(rows, vocab_size, generator=g)

    def initial(self):
        return self.bias, torch.zeros(len(self.bias), dtype=torch.long)

    def step(self, tokens, state):
        bias, t = state
        return torch.log_softmax(self.table[tokens] + bias * (1 + t[:, None]), -1), (bias, t + 1)

    @staticmethod
    def reorder(state, index):
        return tuple(s[index] for s in state)

    def search(self, beam_size, max_length, length_penalty):
        return beam_search(self.step, self.reorder, self.initial(), len(self.bias), EOS, EOS, beam_size,
                           max_length, length_penalty, banned=BANNED)

    def score(self, row: int, seq: list[int], length_penalty: float) -> float:
        """Length-normalized log-probability of seq then <eos>, as beam.py defines it."""
        state = (self.bias[row : row + 1], torch.zeros(1, dtype=torch.long))
        total, token = 0.0, EOS
        for nxt in [*seq, EOS]:
            log_probs, state = self.step(torch.tensor([token]), state)
            total, token = total + float(log_probs[0, nxt]), nxt
        return total / (len(seq) + 1) ** length_penalty

    def greedy(self, max_length: int) -> list[list[int]]:
        out = []
        for row in range(len(self.bias)):
            state, token, seq = (self.bias[row : row + 1], torch.zeros(1, dtype=torch.long)), EOS, []
            for _ in range(max_length):
                log_probs, state = self.step(torch.tensor([token]), state)
                log_probs[0, list(BANNED)] = float("-inf")
                token = int(log_probs.argmax())
                if token == EOS:
                    break
                seq.append(token)
            out.append(seq)
        return out


@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0])
def test_beam_size_one_is_greedy(length_penalty):
    decoder = MarkovDecoder(vocab_size=7, rows=12, seed=3)
    assert decoder.search(1, 6, length_penalty) == decoder.greedy(6)


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0, 2.0])
def test_a_beam_that_holds_every_hypothesis_is_exhaustive_search(length_penalty):
    """With V=5 (<pad> banned, <eos>, 3 words) and 3 words at most there are 1+3+9+27 = 40 sequences: a beam of
    64 prunes none, so it returns the best of all of them, which no narrower beam (greedy included) can beat."""
    decoder, max_length = MarkovDecoder(vocab_size=5, rows=16, seed=7), 3
    every = [list(s) for n in range(max_length + 1) for s in itertools.product((2, 3, 4), repeat=n)]
    best = [max(every, key=lambda s, r=row: decoder.score(r, s, length_penalty)) for row in range(16)]
    assert decoder.search(64, max_length, length_penalty) == best
    for size in (1, 2, 4):
        for row, seq in enumerate(decoder.search(size, max_length, length_penalty)):
            assert len(seq) <= max_length and not set(seq) & {0, EOS}
            assert decoder.score(row, seq, length_penalty) <= decoder.score(row, best[row], length_penalty) + 1e-9
    # the search is not degenerate: some rows' best sequence is not the greedy one
    assert decoder.greedy(max_length) != best


def test_length_penalty_moves_the_choice_towards_longer_sequences():
    decoder = MarkovDecoder(vocab_size=5, rows=16, seed=7)
    short, long = decoder.search(64, 3, 0.0), decoder.search(64, 3, 2.0)
    assert sum(map(len, short)) < sum(map(len, long))


def test_bad_arguments_and_the_length_limit():
    decoder = MarkovDecoder(vocab_size=5, rows=2, seed=0)
    for size in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="beam_size"):
            decoder.search(size, 3, 0.0)
    with pytest.raises(ValueError, match="length_penalty"):
        decoder.search(2, 3, -1.0)
    assert decoder.search(3, 0, 1.0) == [[], []]


def test_captioner_decodes_through_the_beam():
    """ImageCaptioner.caption at beam size 1 is the step-by-step argmax of its own forward pass; a wider beam
    returns captions the model scores (length-normalized) at least as high, on these random weights."""
    from pipeline.models.captioner import PAD, UNK, ImageCaptioner
    from pipeline.models.one_to_many import EOS as START

    torch.manual_seed(0)
    tokens = ["<pad>", "<eos>", "<unk>", *"abcdefgh"]
    model = ImageCaptioner({"tokens": tokens, "image_shape": [8, 8, 3]}, {},
                           {"hidden_size": 16, "embedding_dim": 8}, {}).eval()
    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)

    def score(i, seq, length_penalty=1.0):
        feats, state = model.encode(images[i : i + 1])
        logits, _ = model(torch.tensor([[START, *seq]]), state, feats=feats)
        log_probs = torch.log_softmax(logits[0], -1)
        return float(sum(log_probs[t, tok] for t, tok in enumerate([*seq, START]))) / (len(seq) + 1) ** length_penalty

    greedy = model.caption(images, max_words=5, beam_size=1)
    for i, seq in enumerate(greedy):
        feats, state = model.encode(images[i : i + 1])
        logits, _ = model(torch.tensor([[START, *seq]]), state, feats=feats)
        logits[..., [PAD, UNK]] = float("-inf")
        expected = logits.argmax(-1)[0].tolist()
        assert expected[: len(seq)] == seq and (len(seq) == 5 or expected[len(seq)] == START)
    wide = model.caption(images, max_words=5, beam_size=4, length_penalty=1.0)
    assert all(score(i, w) >= score(i, g) - 1e-5 for i, (g, w) in enumerate(zip(greedy, wide)))
