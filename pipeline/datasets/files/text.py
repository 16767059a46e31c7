"""Text sources: a corpus for the char LM, labelled texts for a classifier, sentence pairs for seq2seq."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from pipeline import text as tokens_of
from pipeline.batch import BOS, EOS, TEXT_SPECIALS, TRANSLATION_SPECIALS, UNK
from pipeline.config import PipelineError
from pipeline.datasets.common import pad
from pipeline.datasets.files.reading import (
    decode,
    fingerprint,
    read_bytes,
    read_table,
    splits,
)
from pipeline.datasets.prepared import Prepared

# --- char_lm: a text file or a folder of .txt files ---------------------------------------------------


def corpus_files(source: Path) -> list[Path]:
    """The file itself, or every `*.txt` under the folder (subfolders too), sorted by relative path."""
    if source.is_dir():
        files = sorted((p for p in source.rglob("*.txt") if p.is_file()),
                       key=lambda p: p.relative_to(source).as_posix())
        if not files:
            raise PipelineError(f"{source}: no .txt files in the folder")
        return files
    return [source]


def read_corpus(source: Path, max_chars: int | None) -> tuple[str, dict]:
    """The text (files joined, a "\\n" added after a file that does not end with one), its source entry."""
    if not source.exists():
        raise PipelineError(f"{source}: file or folder not found (data.source)")
    files = corpus_files(source)
    contents = [read_bytes(f) for f in files]
    parts = [decode(f, data) for f, data in zip(files, contents)]
    text = "".join(p if p.endswith("\n") else p + "\n" for p in parts)[:max_chars]
    return text, fingerprint(source, "text", files, contents)


def build_corpus(cfg, seed: int, path: Path) -> Prepared:
    """`seed` is unused: the split is contiguous (the last val_fraction of the text is val), nothing is drawn."""
    source = path
    text, entry = read_corpus(source, cfg.max_chars)
    chars = sorted(set(text))
    lookup = np.zeros(max(map(ord, chars)) + 1, dtype=np.int64)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    ids = lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    cut = int(round(len(ids) * (1 - cfg.val_fraction)))
    if cut < 2 or len(ids) - cut < 2:
        raise PipelineError(f"{source}: {len(ids)} characters are too few for val_fraction={cfg.val_fraction} "
                            "(train and val need at least 2 characters each)")
    val = ids[cut:]
    return Prepared(
        splits={"train": {"ids": ids[:cut]}, "val": {"ids": val}, "test": {"ids": val.copy()}},
        vocab={"chars": chars},
        source={**entry, "what": "the user's text"},
        stats={"unit": "characters", "characters": len(ids), "lines": text.count("\n"), "test_is_val": True},
    )


# --- many_to_one: a CSV of texts and labels -------------------------------------------------------------


def text_vocab(texts: list[str], min_count: int, max_vocab: int) -> list[str]:
    """<pad>, <unk>, then the tokens seen at least min_count times, most frequent first (ties by token)."""
    counts = Counter(tok for text in texts for tok in tokens_of.tokenize(text))
    common = sorted((tok for tok, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return [*TEXT_SPECIALS, *common[: max_vocab - len(TEXT_SPECIALS)]]


def unk_rate(arrays: dict) -> dict[str, float]:
    """Share of each split's real tokens that are <unk>."""
    rates = {}
    for split, a in arrays.items():
        real = a["tokens"] > 0
        rates[split] = round(float((a["tokens"][real] == UNK).mean()), 4) if real.any() else 0.0
    return rates


def build_labelled_text(cfg, seed: int, path: Path) -> Prepared:
    """Tokenized as the built-in text classifier (pipeline.text.tokenize), vocabulary from train."""
    source = path
    table = read_table(source, cfg.separator)
    text_col = table.index(cfg.text_column, "data.text_column")
    label_col = table.index(cfg.label_column, "data.label_column")
    texts = [" ".join(t.split()) for t in table.cells(text_col)]
    y, labels = table.labels(label_col)
    rng = np.random.default_rng(seed)
    parts = splits(source, len(y), "rows", cfg.val_fraction, cfg.test_fraction, rng, labels=y)
    tokens = text_vocab([texts[i] for i in parts["train"]], cfg.min_count, cfg.max_vocab)
    index = tokens_of.token_index({"tokens": tokens})
    arrays = {}
    for split, idx in parts.items():
        ids, lengths = pad([tokens_of.encode(texts[i], index, cfg.max_tokens) for i in idx])
        arrays[split] = {"tokens": ids, "lengths": lengths, "y": y[idx]}
    return Prepared(
        splits=arrays,
        vocab={"tokens": tokens, "labels": labels},
        source={**fingerprint(source, "labelled_text", [source]), "what": "the user's labelled texts",
                "columns": {"text": table.header[text_col], "label": table.header[label_col]}},
        stats={"unit": "texts", "rows": len(y), "class_counts": _class_counts(y, labels),
               "unk_rate": unk_rate(arrays)},
    )


def _class_counts(y: np.ndarray, labels: list[str]) -> dict[str, int]:
    counts = np.bincount(y, minlength=len(labels))
    return {name: int(c) for name, c in zip(labels, counts)}


# --- seq2seq: a TSV of source and target texts ------------------------------------------------------------


def pair_vocab(token_lists: list[list[str]], min_count: int) -> list[str]:
    """<pad>, <unk>, <bos>, <eos>, then the tokens seen at least min_count times, sorted."""
    counts = Counter(tok for tokens in token_lists for tok in tokens)
    return TRANSLATION_SPECIALS + sorted(tok for tok, c in counts.items()
                                         if c >= min_count and tok not in TRANSLATION_SPECIALS)


def build_pairs(cfg, seed: int, path: Path) -> Prepared:
    source = path
    table = read_table(source, "\t", header=cfg.header)
    src_col = table.index(cfg.source_column, "data.source_column")
    tgt_col = table.index(cfg.target_column, "data.target_column")
    tokenize, _ = tokens_of.TOKENIZERS[cfg.tokens]
    src_tokens = [tokenize(t.strip()) for t in table.cells(src_col)]
    tgt_tokens = [tokenize(t.strip()) for t in table.cells(tgt_col)]
    for name, col, toks in (("source", src_col, src_tokens), ("target", tgt_col, tgt_tokens)):
        empty = next((i for i, t in enumerate(toks) if not t), None)
        if empty is not None:
            raise PipelineError(f"{source}: column {table.name(col)}, line {table.lines[empty]}: empty {name} text")
    rng = np.random.default_rng(seed)
    parts = splits(source, len(src_tokens), "pairs", cfg.val_fraction, cfg.test_fraction, rng)
    vocab = {
        "src_tokens": pair_vocab([src_tokens[i] for i in parts["train"]], cfg.min_count),
        "tgt_tokens": pair_vocab([tgt_tokens[i] for i in parts["train"]], cfg.min_count),
        "tokenizer": cfg.tokens,
    }
    src_index = {t: i for i, t in enumerate(vocab["src_tokens"])}
    tgt_index = {t: i for i, t in enumerate(vocab["tgt_tokens"])}
    bos, eos = BOS, EOS
    arrays = {}
    for split, idx in parts.items():
        src, src_lengths = pad([[src_index.get(t, UNK) for t in src_tokens[i]] for i in idx])
        tgt, tgt_lengths = pad([[bos, *(tgt_index.get(t, UNK) for t in tgt_tokens[i]), eos] for i in idx])
        arrays[split] = {"src": src, "src_lengths": src_lengths, "tgt": tgt, "tgt_lengths": tgt_lengths,
                         "line": np.asarray([table.lines[i] for i in idx], dtype=np.int64)}
    return Prepared(
        splits=arrays,
        vocab=vocab,
        source={**fingerprint(source, "pairs", [source]), "what": "the user's source/target pairs",
                "columns": {"source": table.header[src_col], "target": table.header[tgt_col]}},
        stats={"unit": "pairs", "rows": len(src_tokens), "tokenizer": cfg.tokens},
    )


# --- input examples: what the served model's predict takes, from the user's own data ----------------------


def example_corpus(cfg, path: Path):
    """A one-row generation request primed with the text's first line (at most 20 characters)."""
    import pandas as pd

    text, _ = read_corpus(path, cfg.max_chars)
    prime = text.split("\n", 1)[0][:20] or text[:1]
    return pd.DataFrame({"prime": [prime], "length": [40]})


def example_labelled_text(cfg, path: Path):
    """The first two texts of the file, as predict takes them: a DataFrame with a `text` column."""
    import pandas as pd

    table = read_table(path, cfg.separator)
    column = table.index(cfg.text_column, "data.text_column")
    return pd.DataFrame({"text": [" ".join(t.split()) for t in table.cells(column)[:2]]})


def example_pairs(cfg, path: Path):
    """The first two source texts: a DataFrame with a `text` column."""
    import pandas as pd

    table = read_table(path, "\t", header=cfg.header)
    column = table.index(cfg.source_column, "data.source_column")
    return pd.DataFrame({"text": [t.strip() for t in table.cells(column)[:2]]})
