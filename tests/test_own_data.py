"""Users' own files (pipeline.datasets.files): every format from small files written here, every error in
one line, seeded determinism, atomic prepare, and one tiny training of the topology's model on each."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, Params, PipelineError, parse_params
from pipeline.datasets import files
from pipeline.datasets.datamodule import PreparedDataModule
from pipeline.datasets.prepared import SPLITS, load_manifest, load_split, load_vocab, save_prepared
from pipeline.prepare import prepare, summary, vocab_sizes
from pipeline.text import encode, encode_source, tokenizer
from pipeline.topologies import get_topology

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "the", "a", "was", "very"]


# --- small files of every format -------------------------------------------------------------------


def corpus(tmp_path, name="corpus.txt", lines=60):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(lines)))
    return path


def reviews(tmp_path, n=60, name="reviews.csv"):
    """A text column that decides the label: "good"/"great"/"fine" words are pos, the others neg."""
    rng = np.random.default_rng(0)
    rows = ["id,review,sentiment"]
    for i in range(n):
        pos = i % 2 == 0
        words = rng.choice(WORDS[:3] if pos else WORDS[3:6], 3).tolist() + rng.choice(WORDS[6:], 3).tolist()
        rows.append(f'{i},"{" ".join(rng.permutation(words))}, really!",{"pos" if pos else "neg"}')
    path = tmp_path / name
    path.write_text("\n".join(rows) + "\n")
    return path


def pairs(tmp_path, n=60, name="pairs.tsv"):
    """English -> reversed-word "translation": a learnable toy pair set."""
    rng = np.random.default_rng(1)
    lines = []
    for _ in range(n):
        words = rng.choice(WORDS, rng.integers(2, 5)).tolist()
        lines.append(" ".join(words) + "\t" + " ".join(reversed(words)).upper() + "\textra")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def series_folder(tmp_path, n=30, channels=2):
    """Sine (label "up") or cosine (label "down") series of lengths 5..20 in one folder per label."""
    rng = np.random.default_rng(2)
    root = tmp_path / "series"
    for i in range(n):
        label = ["up", "down"][i % 2]
        t = np.arange(rng.integers(5, 21))
        wave = np.sin(t / 3) if label == "up" else np.cos(t / 3)
        (root / label).mkdir(parents=True, exist_ok=True)
        x = np.stack([wave + 0.1 * c for c in range(channels)], 1) if channels > 1 else wave
        np.save(root / label / f"s{i:03d}.npy", x)
    return root


def ts_file(tmp_path, n=30):
    """A two-channel, unequal-length aeon .ts file with class labels, some series NaN-padded ("?")."""
    lines = ["@problemName Toy", "@timeStamps false", "@missing true", "@univariate false",
             "@equalLength false", "@classLabel true 1 2 10", "@data"]
    rng = np.random.default_rng(3)
    for i in range(n):
        label = ["1", "2", "10"][i % 3]
        values = rng.normal(int(label), 1.0, size=(2, rng.integers(3, 9))).round(3)
        pad = ",?" if i % 4 == 0 else ""
        lines.append(":".join(",".join(map(str, row)) + pad for row in values) + f":{label}")
    path = tmp_path / "toy.ts"
    path.write_text("\n".join(lines) + "\n")
    return path


def steps(tmp_path, sequences=16, name="steps.csv"):
    """Rows of interleaved sequences; label "hi" where the feature is above zero. `t` orders steps backwards."""
    rng = np.random.default_rng(4)
    rows = []
    for s in range(sequences):
        for t in range(int(rng.integers(4, 12))):
            value = float(rng.normal())
            rows.append((f"seq{s}", 100 - t, value, value * 2 + 1, "hi" if value > 0 else "lo"))
    order = rng.permutation(len(rows))  # sequences interleaved; each one's steps keep their relative order
    lines = ["session,t,a,b,activity"] + [",".join(map(str, rows[i])) for i in sorted(order)]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def table(tmp_path, n=80, name="table.csv"):
    """Two numeric features (one on a large scale); the label is the sign of x1 + x2/1000."""
    rng = np.random.default_rng(5)
    x1, x2 = rng.normal(size=n), rng.normal(size=n) * 1000
    lines = ["x1,x2,label"] + [f"{a:.5f},{b:.3f},{'yes' if a + b / 1000 > 0 else 'no'}" for a, b in zip(x1, x2)]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


CASES = {  # name -> (topology, data section from the file written, model class)
    "text": ("char_lm", lambda p: {"source": str(corpus(p))}, "char_lm:CharLM"),
    "text_folder": ("char_lm", lambda p: {"source": str(corpus(p / "books", "b.txt").parent)}, "char_lm:CharLM"),
    "labelled_text": ("many_to_one", lambda p: {"source": str(reviews(p)), "text_column": "review",
                                                "label_column": "sentiment", "min_count": 1},
                      "many_to_one:ManyToOne"),
    "series_npy": ("many_to_one", lambda p: {"source": str(series_folder(p))}, "many_to_one:ManyToOne"),
    "series_ts": ("many_to_one", lambda p: {"source": str(ts_file(p))}, "many_to_one:ManyToOne"),
    "pairs_words": ("seq2seq", lambda p: {"source": str(pairs(p))}, "seq2seq:Seq2Seq"),
    "pairs_chars": ("seq2seq", lambda p: {"source": str(pairs(p)), "tokens": "chars"}, "seq2seq:Seq2Seq"),
    "steps": ("many_to_many", lambda p: {"source": str(steps(p)), "sequence_column": "session",
                                         "label_column": "activity", "order_column": "t"},
              "many_to_many:ManyToMany"),
    "table": ("one_to_one", lambda p: {"source": str(table(p))}, "one_to_one:OneToOne"),
}


def build(case: str, tmp_path, seed: int = 0, **knobs):
    topology, section, _ = CASES[case]
    return files.build(files.data_params(topology, {**section(tmp_path), **knobs}), seed)


def check_conventions(data):
    """What every built-in builder guarantees (tests/test_datasets.py): the three splits, equal first axes,
    int64/float32 arrays, padded arrays as wide as their longest member and zero beyond each length."""
    assert set(data.splits) == set(SPLITS)
    for split, arrays in data.splits.items():
        assert len({len(a) for a in arrays.values()}) == 1, split
        for name, a in arrays.items():
            assert a.dtype in (np.int64, np.float32), f"{split}.{name}: {a.dtype}"
        for lengths, padded in (("lengths", ("tokens", "x", "y")), ("src_lengths", ("src",)),
                                ("tgt_lengths", ("tgt",))):
            if lengths not in arrays:
                continue
            n = arrays[lengths]
            assert n.min() >= 1
            for key in padded:
                if key in arrays and arrays[key].ndim >= 2:
                    assert arrays[key].shape[1] == n.max()
                    beyond = np.arange(arrays[key].shape[1])[None, :] >= n[:, None]
                    assert not arrays[key][beyond].any(), f"{split}.{key}: non-zero padding"


# --- every format ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_every_format_builds_the_topologys_arrays(case, tmp_path):
    data = build(case, tmp_path)
    check_conventions(data)
    fmt = data.source["format"]
    assert fmt.startswith(case.split("_")[0]) or fmt == case
    assert len(data.source["sha256"]) == 64 and data.source["bytes"] > 0
    assert data.source["path"] == CASES[case][1](tmp_path)["source"]  # as written in params.yaml


@pytest.mark.parametrize("case", list(CASES))
def test_examples_are_two_inputs_in_raw_units(case, tmp_path):
    topology, section, _ = CASES[case]
    cfg = files.data_params(topology, section(tmp_path))
    example = files.example(cfg)
    if isinstance(example, np.ndarray):  # series: (2, T, C) float64, NaN after each series' end
        data = files.build(cfg, 0)
        assert example.shape[0] == 2 and example.dtype == np.float64
        assert example.shape[2] == len(data.vocab["mean"])
        assert np.isfinite(example[:, 0]).all()
    else:
        assert list(example.columns) in (["prime", "length"], ["text"], ["x1", "x2"])
        assert len(example) in (1, 2) and example.notna().all().all()


def test_text_is_the_file_split_contiguously(tmp_path):
    path = corpus(tmp_path)
    data = build("text", tmp_path)
    chars = data.vocab["chars"]
    text = "".join(chars[i] for i in np.concatenate([data.splits["train"]["ids"], data.splits["val"]["ids"]]))
    assert text == path.read_text()
    assert len(data.splits["val"]["ids"]) == round(0.1 * len(text))
    assert np.array_equal(data.splits["test"]["ids"], data.splits["val"]["ids"])
    assert data.stats["characters"] == len(text)


def test_text_folder_joins_txt_files_in_sorted_order(tmp_path):
    books = tmp_path / "books"
    (books / "b").mkdir(parents=True)
    (books / "b" / "2.txt").write_text("second")  # no final newline: one is added
    (books / "a.txt").write_bytes("\ufefffirst\r\nline\n".encode())  # BOM and Windows line ends
    (books / "notes.md").write_text("not read")
    data = files.build(files.data_params("char_lm", {"source": str(books), "val_fraction": 0.2}), 0)
    chars = data.vocab["chars"]
    joined = "".join(chars[i] for i in np.concatenate([data.splits["train"]["ids"], data.splits["val"]["ids"]]))
    assert joined == "first\nline\nsecond\n"
    assert data.source["files"] == 2
    (books / "a.txt").write_text("First\nline\n")  # one character changed: another hash
    again = files.build(files.data_params("char_lm", {"source": str(books), "val_fraction": 0.2}), 0)
    assert again.source["sha256"] != data.source["sha256"]


def test_labelled_text_is_tokenized_like_sentiment_with_a_train_vocabulary(tmp_path):
    path = reviews(tmp_path)
    data = build("labelled_text", tmp_path, max_tokens=5)
    assert data.vocab["labels"] == ["neg", "pos"]
    assert data.vocab["tokens"][:2] == ["<pad>", "<unk>"]
    assert {"really", "!", ","} <= set(data.vocab["tokens"])
    train = data.splits["train"]
    assert train["lengths"].max() == 5  # cut to max_tokens
    # row 0 of the file, wherever it went, encodes as sentiment.encode does
    import csv

    first = next(csv.DictReader(path.open()))
    encoded = encode(first["review"], {"tokens": data.vocab["tokens"]}, 5)
    found = [s for s in SPLITS if any(list(r[:n]) == encoded for r, n in zip(data.splits[s]["tokens"],
                                                                              data.splits[s]["lengths"]))]
    assert found
    counts = {s: np.bincount(data.splits[s]["y"], minlength=2) for s in ("val", "test")}
    assert all(abs(int(c[0]) - int(c[1])) <= 1 for c in counts.values())  # stratified: 3 and 3 of 60


def test_series_folder_keeps_channels_lengths_and_train_statistics(tmp_path):
    root = series_folder(tmp_path)
    data = build("series_npy", tmp_path)
    assert data.vocab["labels"] == ["down", "up"]
    raw = {p: np.load(p) for p in sorted(root.rglob("*.npy"))}
    lengths = np.concatenate([data.splits[s]["lengths"] for s in SPLITS])
    assert sorted(lengths.tolist()) == sorted(len(v) for v in raw.values())
    train = data.splits["train"]
    real = np.concatenate([x[:n] for x, n in zip(train["x"], train["lengths"])])
    assert np.allclose(real.mean(0), 0, atol=1e-5) and np.allclose(real.std(0), 1, atol=1e-4)  # train stats
    assert data.splits["train"]["x"].shape[2] == 2 and len(data.vocab["mean"]) == 2


def test_ts_file_labels_sort_by_number_and_nan_padding_is_trimmed(tmp_path):
    data = build("series_ts", tmp_path)
    assert data.vocab["labels"] == ["1", "2", "10"]
    assert data.source["format"] == "series_ts"
    everything = np.concatenate([data.splits[s]["lengths"] for s in SPLITS])
    assert everything.min() >= 3 and everything.max() <= 8


def test_pairs_round_trip_under_words_and_chars(tmp_path):
    path = pairs(tmp_path)
    first_src, first_tgt = path.read_text().splitlines()[0].split("\t")[:2]
    for tokens in ("words", "chars"):
        data = build(f"pairs_{tokens}", tmp_path)
        vocab = data.vocab
        assert vocab["tokenizer"] == tokens and vocab["src_tokens"][:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
        row = {s: np.flatnonzero(data.splits[s]["line"] == 1) for s in SPLITS}
        split = next(s for s in SPLITS if len(row[s]))
        arrays, i = data.splits[split], row[split][0]
        src = arrays["src"][i, : arrays["src_lengths"][i]].tolist()
        tgt = arrays["tgt"][i, : arrays["tgt_lengths"][i]].tolist()
        assert tgt[0] == 2 and tgt[-1] == 3
        if split == "train":  # every token known: the text comes back (lowercased by the words tokenizer)
            assert src == encode_source(first_src, vocab)
            expected = first_tgt.lower() if tokens == "words" else first_tgt
            assert tokenizer(vocab)[1]([vocab["tgt_tokens"][t] for t in tgt[1:-1]]) == expected
    assert files.data_params("seq2seq", {"source": str(path), "header": True, "source_column": "a",
                                         "target_column": "b"}).header


def test_steps_group_interleaved_rows_in_order_column_order(tmp_path):
    path = steps(tmp_path)
    data = build("steps", tmp_path)
    assert data.vocab["features"] == ["a", "b"] and data.vocab["labels"] == ["hi", "lo"]
    assert data.stats["sequences"] == 16
    assert sum(len(data.splits[s]["lengths"]) for s in SPLITS) == 16
    # undo the standardisation: each sequence is its rows sorted by t (here: reverse file order)
    import csv

    rows = list(csv.DictReader(path.open()))
    by_seq = {}
    for r in rows:
        by_seq.setdefault(r["session"], []).append(r)
    expected = {tuple(round(float(r["a"]), 4) for r in sorted(v, key=lambda r: int(r["t"]))) for v in by_seq.values()}
    mean, std = np.asarray(data.vocab["mean"]), np.asarray(data.vocab["std"])
    got = set()
    for s in SPLITS:
        a = data.splits[s]
        for x, y, n in zip(a["x"], a["y"], a["lengths"]):
            raw = x[:n] * std + mean
            got.add(tuple(np.round(raw[:, 0], 4).tolist()))
            assert np.array_equal(y[:n], np.where(raw[:, 0] > 0, 0, 1))  # "hi" = 0 where a > 0
            assert np.allclose(raw[:, 1], raw[:, 0] * 2 + 1, atol=1e-3)
    assert got == expected
    cfg = files.data_params("many_to_many", {**CASES["steps"][1](tmp_path)})
    example = files.example(cfg)  # the first two sequences of the file, raw, in `t` order, NaN-padded
    for row, seq in zip(example, list(by_seq)[:2]):
        want = [float(r["a"]) for r in sorted(by_seq[seq], key=lambda r: int(r["t"]))]
        assert np.allclose(row[: len(want), 0], want) and np.isnan(row[len(want):]).all()


def test_table_is_standardised_with_train_statistics_only(tmp_path):
    path = table(tmp_path)
    data = build("table", tmp_path)
    assert data.vocab["features"] == ["x1", "x2"] and data.vocab["labels"] == ["no", "yes"]
    train = data.splits["train"]["x"]
    assert np.allclose(train.mean(0), 0, atol=1e-5) and np.allclose(train.std(0), 1, atol=1e-4)
    raw = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1))
    restored = np.concatenate([data.splits[s]["x"] for s in SPLITS]) * data.vocab["std"] + data.vocab["mean"]
    order = lambda a: a[np.argsort(a[:, 0])]  # noqa: E731
    assert np.allclose(order(restored), order(raw), rtol=1e-5, atol=1e-4)
    held = np.concatenate([data.splits["val"]["x"], data.splits["test"]["x"]])
    assert not np.allclose(held.mean(0), 0, atol=1e-5)  # held-out rows did not shape the statistics
    only = files.build(files.data_params("one_to_one", {"source": str(path), "feature_columns": ["x2"]}), 0)
    assert only.vocab["features"] == ["x2"] and only.splits["train"]["x"].shape[1] == 1


# --- determinism and the prepared folder -------------------------------------------------------------


@pytest.mark.parametrize("case", ["labelled_text", "series_npy", "pairs_words", "steps", "table"])
def test_same_seed_same_bytes_other_seed_other_split(case, tmp_path):
    first, again = build(case, tmp_path, seed=5), build(case, tmp_path, seed=5)
    other = build(case, tmp_path, seed=6)
    a = save_prepared(first, tmp_path / "a")
    b = save_prepared(again, tmp_path / "b")
    c = save_prepared(other, tmp_path / "c")
    assert a["content_sha256"] == b["content_sha256"] != c["content_sha256"]
    for split in SPLITS:
        assert (tmp_path / "a" / f"{split}.npz").read_bytes() == (tmp_path / "b" / f"{split}.npz").read_bytes()


def test_manifest_names_the_source_and_counts(tmp_path):
    path = reviews(tmp_path)
    data = build("labelled_text", tmp_path)
    data.stats = {**data.stats, "vocab_sizes": vocab_sizes(data.vocab)}
    manifest = save_prepared(data, tmp_path / "out")
    assert manifest == load_manifest(tmp_path / "out")
    import hashlib

    assert manifest["source"]["path"] == str(path)
    assert manifest["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["source"]["bytes"] == path.stat().st_size
    assert manifest["source"]["format"] == "labelled_text"
    assert manifest["rows"] == 60 and sum(manifest["counts"].values()) == 60
    assert manifest["vocab_sizes"] == {"labels": 2, "tokens": len(data.vocab["tokens"])}
    assert manifest["class_counts"] == {"neg": 30, "pos": 30}


# --- errors: one line, naming file, column and line ------------------------------------------------------


def error_of(topology, section) -> str:
    with pytest.raises(PipelineError) as info:
        files.build(files.data_params(topology, section), 0)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_or_folder(tmp_path):
    for topology, name in (("char_lm", "nope.txt"), ("char_lm", "nodir"), ("many_to_one", "reviews.csv"),
                           ("many_to_one", "series"), ("many_to_one", "x.ts"), ("seq2seq", "p.tsv"),
                           ("many_to_many", "s.csv"), ("one_to_one", "t.csv")):
        message = error_of(topology, {"source": str(tmp_path / name)})
        assert message.startswith(str(tmp_path / name)) and "not found" in message


def test_missing_column_names_it_and_lists_the_columns(tmp_path):
    path = reviews(tmp_path)
    message = error_of("many_to_one", {"source": str(path), "text_column": "body"})
    assert "'body'" in message and "data.text_column" in message and "'review'" in message
    message = error_of("one_to_one", {"source": str(table(tmp_path)), "label_column": "class"})
    assert "'class'" in message and "data.label_column" in message
    message = error_of("seq2seq", {"source": str(pairs(tmp_path)), "target_column": 7})
    assert "no column 7" in message and "3 columns" in message
    semicolons = tmp_path / "excel.csv"
    semicolons.write_text("text;label\ngood;pos\n")
    assert error_of("many_to_one", {"source": str(semicolons)}).endswith(
        "the columns are 'text;label' (is the delimiter ';'? set data.delimiter)")
    message = error_of("many_to_many", {"source": str(steps(tmp_path)), "label_column": "activity"})
    assert "'sequence'" in message and "data.sequence_column" in message


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(content, tmp_path):
    for topology, name in (("char_lm", "e.txt"), ("many_to_one", "e.csv"), ("seq2seq", "e.tsv"),
                           ("one_to_one", "e.csv"), ("many_to_one", "e.ts")):
        (tmp_path / name).write_bytes(content)
        assert "empty file" in error_of(topology, {"source": str(tmp_path / name)})
    (tmp_path / "h.csv").write_text("text,label\n")
    assert "no data rows" in error_of("many_to_one", {"source": str(tmp_path / "h.csv")})


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ngood,pos\ncafé,neg\n".encode("latin-1"))
    message = error_of("many_to_one", {"source": str(path)})
    assert message == f"{path}: not UTF-8 text: byte 0xe9 at line 3 (save the file as UTF-8)"
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text("fine")
    (books / "b.txt").write_bytes(b"\xff\xfe")
    assert error_of("char_lm", {"source": str(books)}).startswith(f"{books / 'b.txt'}: not UTF-8")


def test_a_label_column_with_one_class(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("text,label\n" + "".join(f"text {i},pos\n" for i in range(20)))
    assert error_of("many_to_one", {"source": str(path)}) == (
        f"{path}: column 'label' holds one class ('pos'); a classifier needs at least two")
    path = tmp_path / "one_table.csv"
    path.write_text("x,label\n" + "".join(f"{i},a\n" for i in range(20)))
    assert "holds one class ('a')" in error_of("one_to_one", {"source": str(path)})
    root = tmp_path / "series"
    (root / "only").mkdir(parents=True)
    for i in range(5):
        np.save(root / "only" / f"{i}.npy", np.arange(4.0))
    assert "one class ('only')" in error_of("many_to_one", {"source": str(root)})


def test_non_numeric_features_name_column_and_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("x1,x2,label\n1,2,a\n3,red,b\n4,5,a\n")
    assert error_of("one_to_one", {"source": str(path)}) == (
        f"{path}: column 'x2', line 3: 'red' is not a finite number (features must be numbers: "
        "fix the cell, or list the others in data.feature_columns)")
    path.write_text("x1,x2,label\n1,2,a\n3,,b\n4,5,a\n")
    assert "column 'x2', line 3: an empty cell" in error_of("one_to_one", {"source": str(path)})
    path.write_text("x1,x2,label\n1,2,a\n3,inf,b\n4,5,a\n")
    assert "'inf' is not a finite number" in error_of("one_to_one", {"source": str(path)})
    path.write_text("sequence,x,label\ns,1,a\ns,two,b\n")
    assert "column 'x', line 3: 'two'" in error_of("many_to_many", {"source": str(path)})


def test_too_few_rows_for_the_splits(tmp_path):
    path = tmp_path / "few.csv"
    path.write_text("text,label\ngood,pos\nbad,neg\n")
    assert error_of("many_to_one", {"source": str(path)}) == (
        f"{path}: 2 rows are too few for val_fraction=0.1, test_fraction=0.1 (every split needs at least one)")
    path = tmp_path / "tiny.txt"
    path.write_text("abc")  # and the "\n" added at the end
    assert "4 characters are too few" in error_of("char_lm", {"source": str(path)})
    path = tmp_path / "steps.csv"
    path.write_text("sequence,x,label\ns,1,a\ns,2,b\nt,1,a\n")
    assert "2 sequences are too few" in error_of("many_to_many", {"source": str(path)})


def test_other_malformed_inputs(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("text,label\ngood,pos\nbad,neg,extra\n")
    assert error_of("many_to_one", {"source": str(path)}) == (
        f"{path}: line 3 has 3 fields, the header 2 (delimiter ',')")
    path.write_text('text,label\n"two\nlines",pos\n\nbad,neg,extra\n')  # a quoted line break, a blank line
    assert "line 5 has 3 fields" in error_of("many_to_one", {"source": str(path)})
    pairs_path = tmp_path / "p.tsv"
    pairs_path.write_text("hello\tbonjour\n\tvide\n")
    assert error_of("seq2seq", {"source": str(pairs_path)}) == f"{pairs_path}: column '0', line 2: empty source text"
    root = tmp_path / "series"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    np.save(root / "a" / "0.npy", np.ones((4, 2)))
    np.save(root / "b" / "0.npy", np.ones((4, 3)))
    assert "3 channels, the first series 2" in error_of("many_to_one", {"source": str(root)})
    np.save(root / "b" / "0.npy", np.array([1.0, np.nan, 2.0]))
    assert "missing or non-finite value at step 1" in error_of("many_to_one", {"source": str(root)})
    (root / "b" / "0.npy").write_text("not an array")
    assert "not a readable .npy array" in error_of("many_to_one", {"source": str(root)})
    bad_ts = tmp_path / "bad.ts"
    bad_ts.write_text("@problemName x\n@classLabel false\n@data\n1,2,3\n")
    assert error_of("many_to_one", {"source": str(bad_ts)}).startswith(f"{bad_ts}: ")


def test_params_refuse_unknown_knobs_formats_and_fractions(tmp_path, monkeypatch):
    text_knobs = r"^data: the text format has no knob 'test_fraction'; its knobs: source, val_fraction, format, " \
                 r"max_chars$"
    with pytest.raises(ConfigError, match=text_knobs):
        files.data_params("char_lm", {"source": "a.txt", "test_fraction": 0.1})
    with pytest.raises(ConfigError, match=r"data: the series format has no knob 'text_column'"):
        files.data_params("many_to_one", {"source": "folder", "text_column": "t"})
    with pytest.raises(ConfigError, match=r"seq2seq does not read data.format 'table'; it reads pairs"):
        files.data_params("seq2seq", {"source": "a.csv", "format": "table"})
    with pytest.raises(ConfigError, match=r"data.source: required"):
        files.data_params("one_to_one", {"label_column": "y"})
    with pytest.raises(ConfigError, match=r"leave at least 10%"):
        files.data_params("one_to_one", {"source": "a.csv", "val_fraction": 0.5, "test_fraction": 0.4})
    with pytest.raises(ConfigError, match=r"one_to_many takes no file source"):
        files.data_params("one_to_many", {"source": "a.csv"})
    with pytest.raises(ConfigError, match=r"source_column is a name: set header: true"):
        files.data_params("seq2seq", {"source": "a.tsv", "source_column": "en"})
    assert files.data_params("many_to_one", {"source": "x.ts"}).format == "series"
    assert files.data_params("many_to_one", {"source": "x.csv"}).format == "labelled_text"
    assert files.data_params("many_to_one", {"source": "x.tsv"}).separator == "\t"
    (tmp_path / "data" / "own" / "motions.v2").mkdir(parents=True)  # a folder with a dot, under data/own/
    monkeypatch.chdir(tmp_path)
    assert files.data_params("many_to_one", {"source": "motions.v2"}).format == "series"
    for section, message in (
            ({"topology": "char_lm", "data": {"source": "my.txt", "text_column": "t"}},
             "params.yaml: mine.data: the text format has no knob 'text_column'; its knobs: source, val_fraction, "
             "format, max_chars"),
            ({"topology": "many_to_one", "data": {"source": "motions", "min_count": 1}},
             "params.yaml: mine.data: the series format has no knob 'min_count'; its knobs: source, val_fraction, "
             "test_fraction, format"),
            ({"topology": "one_to_many", "data": {"source": "a.csv"}},
             "params.yaml: mine.topology: one_to_many takes no file source; those that do: char_lm, many_to_one, "
             "seq2seq, many_to_many, one_to_one"),
            ({"topology": "one_to_one", "data": {"source": "a.csv", "val_fraction": 0.5, "test_fraction": 0.5}},
             "params.yaml: mine.data: val_fraction + test_fraction must leave at least 10% for training")):
        with pytest.raises(ConfigError) as info:
            parse_params({"tasks": ["mine"], "mine": section})
        assert str(info.value) == message


# --- the topology's model trains on it ---------------------------------------------------------------------


def loss_over(model, dm, split="train") -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in dm.loader(split, batch_size=64):
            s, n = model.loss_terms(batch)
            total, count = total + float(s), count + int(n)
    return total / count


@pytest.mark.parametrize("case", ["text", "labelled_text", "series_ts", "pairs_chars", "steps", "table"])
def test_the_topologys_model_trains_on_it(case, tmp_path):
    topology, _, _ = CASES[case]
    data = build(case, tmp_path)
    save_prepared(data, tmp_path / "prepared")
    L.seed_everything(0, workers=True)
    dm = PreparedDataModule(tmp_path / "prepared", batch_size=8, seed=0, block_size=16)
    net = get_topology(topology).model_class(load_vocab(tmp_path / "prepared"), dm.dims(),
                    {"hidden_size": 16, "embedding_dim": 8}, {"lr": 0.02, "batch_size": 8})
    before = loss_over(net, dm)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(net, datamodule=dm)
    after = loss_over(net, dm)
    assert np.isfinite(after) and after < before, (before, after)
    assert np.isfinite(loss_over(net, dm, "val"))


# --- atomic writes ----------------------------------------------------------------------------------------


def own_params(tmp_path, **tasks) -> Params:
    """params with user tasks: name -> (topology, data section)."""
    raw = {"tasks": list(tasks), **{name: {"topology": t, "data": d} for name, (t, d) in tasks.items()}}
    return parse_params(raw)


def test_prepare_reads_a_task_declared_in_params(tmp_path):
    params = own_params(tmp_path, mytable=("one_to_one", {"source": str(table(tmp_path)), "label_column": "label"}))
    manifest = prepare("mytable", params, root=tmp_path / "prepared")
    assert manifest["source"]["format"] == "table" and manifest["vocab_sizes"] == {"features": 2, "labels": 2}
    assert "mytable: train " in summary("mytable", manifest)


def test_a_failed_build_leaves_the_previous_prepared_output(tmp_path):
    out = tmp_path / "prepared"
    good = own_params(tmp_path, mytable=("one_to_one", {"source": str(table(tmp_path))}))
    prepare("mytable", good, root=out)
    before = {p.name: p.read_bytes() for p in (out / "mytable").iterdir()}
    bad = tmp_path / "bad.csv"
    rows = "".join(f"{i},{'ab'[i % 2]}\n" for i in range(11))
    bad.write_text("x1,label\n" + rows + "oops,b\n")  # the non-number on the last line: found after the rest is read
    params = own_params(tmp_path, mytable=("one_to_one", {"source": str(bad)}),
                        fresh=("one_to_one", {"source": str(bad)}))
    with pytest.raises(PipelineError, match="line 13: 'oops'"):
        prepare("mytable", params, root=out)
    assert {p.name: p.read_bytes() for p in (out / "mytable").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == ["mytable"]  # no temporary folder left behind
    with pytest.raises(PipelineError):
        prepare("fresh", params, root=out)
    assert not (out / "fresh").exists()
    assert json.loads((out / "mytable" / "manifest.json").read_text())["source"]["format"] == "table"
    assert load_split(out / "mytable", "train")["x"].shape[1] == 2
