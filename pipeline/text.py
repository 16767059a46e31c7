"""How text becomes token ids and back: one place for what `prepare` and a served model's `predict` share.

Two tokenisations, each recorded by the kind of vocabulary it makes (pipeline.batch for the ids):

- text classifiers (many_to_one over `tokens`): lowercased words (inner apostrophes kept) and punctuation
  marks; `tokenize`, `encode`.
- translators (seq2seq over `src_tokens`/`tgt_tokens`): vocab["tokenizer"] says which (`tokenizer(vocab)`):
  "words" (the default): lowercased words, every punctuation mark on its own (hyphens too: "quarante-deux"
  -> quarante - deux), `translation_tokenize` and `detokenize`; "chars": every character. `encode_source`,
  `encode_target` use it.

Pure Python: `prepare` imports it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from pipeline.batch import BOS_TOKEN, EOS_TOKEN, UNK_TOKEN

TOKEN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")  # words (with inner apostrophes), each punctuation mark
TRANSLATION_TOKEN = re.compile(r"\w+|[^\w\s]")  # words; every hyphen, comma (any punctuation) on its own
GLUE_BEFORE = set(",.;:!?-")  # detokenize: no space before these
GLUE_AFTER = {"-"}  # nor after these


def tokenize(text: str) -> list[str]:
    """Lowercased words and punctuation marks: "It's great!" -> ["it's", "great", "!"]."""
    return TOKEN.findall(text.lower())


def token_index(vocab: Mapping, key: str = "tokens") -> Mapping[str, int]:
    """token -> id from vocab.json's dict ({key: [...]}) or an index already built."""
    tokens = vocab.get(key)
    if isinstance(tokens, list):
        return {tok: i for i, tok in enumerate(tokens)}
    return vocab


def encode(text: str, vocab: Mapping, max_tokens: int | None = None) -> list[int]:
    """Token ids of `text` (unknown words -> <unk>), cut to max_tokens; never empty."""
    index = token_index(vocab)
    unk = index[UNK_TOKEN]
    ids = [index.get(tok, unk) for tok in tokenize(text)][:max_tokens]
    return ids or [unk]


def translation_tokenize(text: str) -> list[str]:
    """ "one thousand, two hundred and forty-two" -> [..., "thousand", ",", ..., "forty", "-", "two"]."""
    return TRANSLATION_TOKEN.findall(text.lower())


def detokenize(tokens: list[str]) -> str:
    """Inverse of translation_tokenize: ["quarante", "-", "deux"] -> "quarante-deux"."""
    out = ""
    for i, tok in enumerate(tokens):
        if i and tok not in GLUE_BEFORE and tokens[i - 1] not in GLUE_AFTER:
            out += " "
        out += tok
    return out


def characters(text: str) -> list[str]:
    """A character tokeniser (a translator's vocab["tokenizer"] == "chars"): every character, case kept."""
    return list(text)


TOKENIZERS: dict[str, tuple[Callable[[str], list[str]], Callable[[list[str]], str]]] = {
    "words": (translation_tokenize, detokenize),
    "chars": (characters, "".join),
}


def tokenizer(vocab: Mapping) -> tuple[Callable[[str], list[str]], Callable[[list[str]], str]]:
    """(tokenize, detokenize) of a translator's vocabulary: vocab["tokenizer"], "words" where absent."""
    return TOKENIZERS[vocab.get("tokenizer", "words") if isinstance(vocab.get("tokenizer"), str) else "words"]


def encode_source(text: str, vocab: Mapping) -> list[int]:
    """Source text -> source ids (no BOS/EOS); `vocab` is vocab.json's dict or a ready token -> id map (words)."""
    index = token_index(vocab, "src_tokens")
    return [index.get(tok, index[UNK_TOKEN]) for tok in tokenizer(vocab)[0](text)]


def encode_target(text: str, vocab: Mapping) -> list[int]:
    """Target text -> BOS ids EOS."""
    index = token_index(vocab, "tgt_tokens")
    return [index[BOS_TOKEN], *(index.get(tok, index[UNK_TOKEN]) for tok in tokenizer(vocab)[0](text)),
            index[EOS_TOKEN]]
