"""The input contract of every served model (pipeline/serving_inputs.py) through the pyfunc model, in process.

Models of every topology are built with random weights (seeded) and saved as training saves them (weights +
config.json), so these run in seconds; the contract does not depend on what a model learned. References are
the module itself called directly: a batch must give each row what that row gives alone, a missing cell the
documented default, a bad cell one InputError line naming its row and column. The real server over trained
models is in test_serve_http.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from pipeline.pyfunc_model import RNNPyfunc
from pipeline.serving_defaults import CHARLM, MAX_CHARS, MAX_NOTES, MELODY
from pipeline.serving_inputs import InputError, OneLineError, PredictError
from pipeline.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
CHARS = list("\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
SPECS = {  # task -> (vocab, dims, model settings): small, but the shapes the real tasks have
    "charlm": ({"chars": CHARS}, {}, {}),
    "melody": ({"tokens": ["<pad>", "<eos>", "C5|1.0", "D5|1.0", "E5|0.5", "rest|1.0", "G4|2.0"]}, {}, {}),
    "sentiment": ({"tokens": ["<pad>", "<unk>", "a", "good", "film", "dull", "and"], "labels": ["rotten", "fresh"]},
                  {}, {}),
    "translation": ({"src_tokens": SPECIALS + ["-", "forty", "one", "two"],
                     "tgt_tokens": SPECIALS + ["-", "deux", "quarante", "un"]}, {}, {}),
    "digits": ({"labels": [str(d) for d in range(10)]}, {"input_shape": [28, 28]}, {}),
    "gesture": ({"labels": [str(i) for i in range(1, 11)], "mean": [0.3], "std": [1.7]}, {"input_shape": [361, 1]},
                {"frame_stride": 8}),
    "activity": ({"labels": ["badminton", "running", "standing", "walking"], "mean": [0.2, -0.1, 0.5, 0.0, 0.3, 0.1],
                  "std": [1.5, 2.0, 0.7, 1.0, 1.2, 0.9]}, {"input_shape": [400, 6]}, {}),
}


def save_model(folder: Path, task: str) -> Path:
    """models/<task>/ as training writes it, with seeded random weights."""
    vocab, dims, model = SPECS[task]
    info = get_task(task)
    hparams = {"vocab": vocab, "dims": dims, "model": {"hidden_size": 8, "embedding_dim": 4, **model}, "train": {}}
    torch.manual_seed(0)
    net = info.model_class(**hparams)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "weights.safetensors")
    (folder / "config.json").write_text(json.dumps({"task": task, "topology": info.topology_name,
                                                    "model_class": info.model, "hparams": hparams}))
    return folder


def load(folder: Path) -> RNNPyfunc:
    model = RNNPyfunc()
    model.load_context(type("Context", (), {"artifacts": {"model": str(folder)}})())
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, RNNPyfunc]:
    root = tmp_path_factory.mktemp("models")
    return {task: load(save_model(root / task, task)) for task in SPECS}


def refused(model, model_input, fragment: str) -> str:
    with pytest.raises(InputError) as err:
        model.predict(None, model_input)
    message = err.value.message
    assert "\n" not in message and fragment in message, message
    assert err.value.get_http_status_code() == 400
    return message


# --- sampling numerics in the models --------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-30])
def test_tiny_temperatures_are_greedy(models, temperature):
    net = models["charlm"].model
    assert net.sample("The ", 40, temperature, seed=1) == net.sample("The ", 40, 0.0)
    melody = models["melody"].model
    prime = torch.tensor([[2], [3]])
    assert melody.generate(prime, 12, temperature, generator=torch.Generator().manual_seed(0)) == \
        melody.generate(prime, 12, 0.0)


@pytest.mark.parametrize("length, temperature, top_k, fragment", [
    (-1, 0.8, None, "length"), (5, math.nan, None, "temperature"), (5, math.inf, None, "temperature"),
    (5, -0.1, None, "temperature"), (5, 0.8, 0, "top_k"), (5, 0.8, -2, "top_k"), (2.5, 0.8, None, "length")])
def test_bad_sampling_arguments_are_one_line_value_errors(models, length, temperature, top_k, fragment):
    for generate in (lambda: models["charlm"].model.sample("The ", length, temperature, top_k, seed=0),
                     lambda: models["melody"].model.generate(torch.tensor([[2]]), length, temperature, top_k)):
        with pytest.raises(ValueError, match=fragment) as err:
            generate()
        assert "\n" not in str(err.value)


def test_top_k_at_or_above_the_vocabulary_cuts_nothing(models):
    net = models["charlm"].model
    assert net.sample("The ", 30, 1.0, 10_000, seed=4) == net.sample("The ", 30, 1.0, len(CHARS), seed=4) == \
        net.sample("The ", 30, 1.0, None, seed=4)


# --- generators through the pyfunc ----------------------------------------------------------------------


def test_partly_filled_charlm_batch_takes_defaults_per_row(models):
    model, net = models["charlm"], models["charlm"].model
    frame = pd.DataFrame({"prime": ["The ", "ROMEO:", "A"], "length": [30, np.nan, 12],
                          "temperature": [0.0, np.nan, 1.5], "top_k": [np.nan, 3, 2], "seed": [np.nan, 5, 9]})
    assert frame["length"].dtype == np.float64  # what a JSON batch with a missing cell becomes
    out = model.predict(None, frame)
    assert out["text"].tolist() == [net.sample("The ", 30, 0.0), net.sample("ROMEO:", CHARLM.length, CHARLM.temperature,
                                                                             3, seed=5), net.sample("A", 12, 1.5, 2, 9)]
    ints = pd.DataFrame({"prime": ["The "], "length": [30], "temperature": [0], "top_k": [3], "seed": [1]})
    assert model.predict(None, ints)["text"][0] == net.sample("The ", 30, 0.0)
    strings = pd.DataFrame({"prime": ["The "], "length": ["30"], "temperature": ["0.0"]})  # CSV read as text
    assert model.predict(None, strings)["text"][0] == net.sample("The ", 30, 0.0)


def test_melody_takes_sampling_options_and_samples_by_default(models):
    model, net = models["melody"], models["melody"].model
    out = model.predict(None, pd.DataFrame({"seed": ["C5|1.0", "D5|1.0"], "length": [10, np.nan],
                                            "temperature": [0.0, 1.2], "top_k": [np.nan, 2],
                                            "random_seed": [np.nan, 3]}))
    greedy = net.generate(torch.tensor([[2]]), 10, 0.0)[0]
    drawn = net.generate(torch.tensor([[3]]), MELODY.length, 1.2, 2, generator=torch.Generator().manual_seed(3))[0]
    tokens = SPECS["melody"][0]["tokens"]
    assert out["melody"].tolist() == [" ".join(["C5|1.0"] + [tokens[i] for i in greedy]),
                                      " ".join(["D5|1.0"] + [tokens[i] for i in drawn])]
    seeded = pd.DataFrame({"seed": ["C5|1.0"], "random_seed": [11]})
    assert model.predict(None, seeded).equals(model.predict(None, seeded))  # the default samples: seed repeats


@pytest.mark.parametrize("task, row, fragment", [
    ("charlm", {"temperature": -1}, "row 1, column 'temperature'"),
    ("charlm", {"temperature": math.inf}, "row 1, column 'temperature'"),
    ("charlm", {"temperature": "warm"}, "row 1, column 'temperature'"),
    ("charlm", {"top_k": 0}, "row 1, column 'top_k'"),
    ("charlm", {"top_k": True}, "row 1, column 'top_k'"),
    ("charlm", {"length": -3}, "row 1, column 'length'"),
    ("charlm", {"length": 1.5}, "row 1, column 'length'"),
    ("charlm", {"length": MAX_CHARS + 1}, f"between 0 and {MAX_CHARS}"),
    ("charlm", {"seed": -1}, "row 1, column 'seed'"),
    ("charlm", {"prime": ""}, "row 1, column 'prime': empty"),
    ("charlm", {"prime": None}, "row 1, column 'prime': missing"),
    ("charlm", {"prime": 5}, "row 1, column 'prime': expected a string"),
    ("charlm", {"prime": "caf\u00e9"}, "characters the model does not know: '\u00e9'"),
    ("melody", {"seed": "C4"}, "row 1, column 'seed': unknown seed note 'C4'"),
    ("melody", {"length": MAX_NOTES + 1}, f"between 0 and {MAX_NOTES}"),
    ("melody", {"random_seed": 2.5}, "row 1, column 'random_seed'"),
])
def test_bad_generation_rows_name_row_and_column(models, task, row, fragment):
    first = {"charlm": {"prime": "The ", "length": 3}, "melody": {"seed": "C5|1.0", "length": 3}}[task]
    refused(models[task], pd.DataFrame([first, first | row]), fragment)


def test_one_request_generates_at_most_the_cap(models):
    half = MAX_CHARS // 2 + 1
    refused(models["charlm"], pd.DataFrame({"prime": ["A", "B"], "length": [half, half]}), f"at most {MAX_CHARS}")
    out = models["charlm"].predict(None, pd.DataFrame({"prime": ["A"], "length": [MAX_CHARS]}))
    assert len(out["text"][0]) == 1 + MAX_CHARS


def test_unknown_and_missing_columns(models):
    refused(models["charlm"], pd.DataFrame({"prime": ["A"], "temprature": [0.5]}), "unknown column(s) 'temprature'")
    refused(models["sentiment"], pd.DataFrame({"txt": ["a"]}), "unknown column(s) 'txt'")
    refused(models["translation"], pd.DataFrame({"length": [1]}), "unknown column(s) 'length'")


# --- text in ----------------------------------------------------------------------------------------------


def test_sentiment_flags_rows_it_knows_nothing_of(models):
    model, net = models["sentiment"], models["sentiment"].model
    out = model.predict(None, pd.DataFrame({"text": ["a good film", "", "zzz qqq", "a dull zzz film", "!!"]}))
    assert out["label"].tolist()[1:3] == [None, None] and out["probability"].tolist()[1:3] == [None, None]
    assert out["label"][4] is None  # "!" is a token the vocabulary lacks
    assert out["unknown_share"].tolist() == [0.0, 0.0, 1.0, 0.25, 1.0]
    for i, ids in ((0, [2, 3, 4]), (3, [2, 5, 1, 4])):  # a, good, film / a, dull, <unk>, film
        with torch.no_grad():
            probs = torch.softmax(net(torch.tensor([ids]), torch.tensor([len(ids)])), -1)[0]
        assert out["label"][i] == ["rotten", "fresh"][int(probs.argmax())]
        assert out["probability"][i] == pytest.approx(float(probs.max()), abs=1e-6)


def test_translation_empty_text_and_unknown_words(models):
    model, net = models["translation"], models["translation"].model
    out = model.predict(None, pd.DataFrame({"text": ["forty-two", "", "  ", "banana", "forty bananas"]}))
    assert out["translation"].tolist()[1:4] == ["", "", None]
    assert out["unknown_share"].tolist() == [0.0, 0.0, 0.0, 1.0, 0.5]
    words = SPECS["translation"][0]["tgt_tokens"]
    from pipeline.datasets.translation import detokenize

    expected = detokenize([words[t] for t in net.greedy(torch.tensor([[5, 4, 7]]), torch.tensor([3]))[0]])
    assert out["translation"][0] == expected


@pytest.mark.parametrize("task", ["sentiment", "translation"])
@pytest.mark.parametrize("value, fragment", [(None, "missing"), (np.nan, "missing"), (42, "expected a string, got int"),
                                             (["a"], "expected a string, got list")])
def test_bad_text_cells(models, task, value, fragment):
    refused(models[task], pd.DataFrame({"text": ["a good film", value]}), f"row 1, column 'text': {fragment}")


# --- features in ------------------------------------------------------------------------------------------


def test_images_any_float_layout_and_checked_pixels(models):
    model, net = models["digits"], models["digits"].model
    x = np.random.default_rng(0).random((3, 28, 28))
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(x.astype(np.float32))), -1)
    expected = model.predict(None, x)
    assert expected["label"].tolist() == [str(int(i)) for i in probs.argmax(-1)]
    for same in (x.astype(np.float32), x.reshape(3, 784), list(x), pd.DataFrame(x.reshape(3, 784))):
        pd.testing.assert_frame_equal(model.predict(None, same), expected)
    pd.testing.assert_frame_equal(model.predict(None, x[0]), expected.iloc[:1])  # one image alone
    bad = x.copy()
    bad[1, 3, 4] = np.nan
    refused(model, bad, "row 1: the image holds NaN")
    refused(model, x * 255, "row 0: pixel values must lie in [0, 1]")
    refused(model, np.zeros((2, 27, 28)), "expected images of shape (28, 28)")
    refused(model, [np.zeros((28, 28)), np.zeros((20, 20))], "rows of different lengths")


def raw_series(channels: int, lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, channels)) * 2 + 1 for n in lengths]


def nan_padded(rows: list[np.ndarray]) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows), rows[0].shape[1]), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def test_series_are_read_at_their_own_length(models):
    """NaN padding, a list per row and a `series` column give each series exactly what it gives alone."""
    model = models["gesture"]
    rows = raw_series(1, [60, 200, 37, 361])
    alone = pd.concat([model.predict(None, r[None]) for r in rows], ignore_index=True)
    assert alone["length"].tolist() == [60, 200, 37, 361]
    for batch in (nan_padded(rows), nan_padded(rows)[..., 0], rows, [r[:, 0].tolist() for r in rows],
                  pd.DataFrame({"series": [r.tolist() for r in rows]})):
        out = model.predict(None, batch)
        assert out["label"].tolist() == alone["label"].tolist()
        np.testing.assert_allclose(out["probability"], alone["probability"], atol=1e-6)
        assert out["length"].tolist() == alone["length"].tolist()
    json_nulls = np.array(nan_padded(rows)[..., 0].tolist(), dtype=object)  # "inputs" with null padding
    json_nulls[np.isnan(nan_padded(rows)[..., 0])] = None
    assert model.predict(None, json_nulls)["label"].tolist() == alone["label"].tolist()


def test_zero_padding_is_data_and_shows_in_the_length(models):
    model = models["gesture"]
    (row,) = raw_series(1, [60])
    zeros = np.zeros((1, 200, 1))
    zeros[0, :60] = row
    assert model.predict(None, zeros)["length"].tolist() == [200]  # read as 200 steps: visible, not silent
    nan = np.full((1, 200, 1), np.nan)
    nan[0, :60] = row
    pd.testing.assert_frame_equal(model.predict(None, nan), model.predict(None, row[None]))


def test_bad_series(models):
    model = models["gesture"]
    inside = nan_padded(raw_series(1, [30, 40]))
    inside[1, 10, 0] = np.nan
    refused(model, inside, "row 1: NaN at step 10, channel 0, inside the series")
    refused(model, np.full((2, 5), np.nan), "row 0: the series has no steps")
    refused(model, [np.ones(5), np.array([1.0, np.inf])], "row 1: infinite value at step 1")
    refused(model, [np.ones((5, 2))], "row 0: expected a series of shape (T, 1)")
    refused(model, [["a", "b"]], "row 0: expected numbers")
    steps = nan_padded(raw_series(6, [12, 20]))
    steps[0, 3, 2] = np.nan
    refused(models["activity"], steps, "row 0: NaN at step 3, channel 2")


def test_per_step_labels_at_each_own_length(models):
    model = models["activity"]
    rows = raw_series(6, [100, 250, 17], seed=1)
    out = model.predict(None, nan_padded(rows))
    assert out["length"].tolist() == [100, 250, 17] and [len(x) for x in out["labels"]] == [100, 250, 17]
    for i, r in enumerate(rows):
        assert out["labels"][i] == model.predict(None, r[None])["labels"][0]
    assert model.predict(None, rows)["labels"].tolist() == out["labels"].tolist()


# --- empty input, errors --------------------------------------------------------------------------------------

EMPTY = {"charlm": (pd.DataFrame({"prime": []}), ["text"]), "melody": (pd.DataFrame({"seed": []}), ["seed", "melody"]),
         "sentiment": (pd.DataFrame({"text": []}), ["label", "probability", "unknown_share"]),
         "translation": (pd.DataFrame({"text": []}), ["text", "translation", "unknown_share"]),
         "digits": (np.zeros((0, 28, 28)), ["label", "probability"]),
         "gesture": (np.zeros((0, 50, 1)), ["label", "probability", "length"]),
         "activity": (np.zeros((0, 50, 6)), ["labels", "length"])}


@pytest.mark.parametrize("task", list(EMPTY))
def test_empty_input_gives_an_empty_frame_with_the_output_columns(models, task):
    model_input, columns = EMPTY[task]
    out = models[task].predict(None, model_input)
    assert isinstance(out, pd.DataFrame) and len(out) == 0 and list(out.columns) == columns


def test_errors_keep_one_line_through_the_scoring_server_rewrite(models, monkeypatch):
    err = InputError("row 3, column 'x':\n  bad")
    err.message = f"Failed to predict data '{pd.DataFrame({'x': [1, 2]})}'. \nError: {err.message}"  # what MLflow does
    assert err.message == "row 3, column 'x': bad" and json.loads(err.serialize_as_json())["message"] == err.message
    monkeypatch.setattr(models["digits"], "model", lambda x: (_ for _ in ()).throw(RuntimeError("boom\nmore")))
    with pytest.raises(PredictError) as failed:
        models["digits"].predict(None, np.zeros((1, 28, 28)))
    assert failed.value.get_http_status_code() == 500 and failed.value.message.endswith("RuntimeError: boom")
    assert isinstance(failed.value, OneLineError) and not isinstance(failed.value, InputError)


# --- the logged model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["charlm", "melody", "sentiment", "translation"])
def test_table_examples_and_no_mlflow_schema(task, tmp_path, models):
    """No input schema: MLflow passes what the payload parses to, and the contract checks it (see
    tracking._signature_and_example for what each MLflow column type would refuse)."""
    from pipeline.tracking import _signature_and_example

    schema, example = _signature_and_example(save_model(tmp_path / task, task))
    assert schema is None and isinstance(example, pd.DataFrame)
    assert len(models[task].predict(None, example)) == len(example)


@pytest.mark.parametrize("task", ["digits", "gesture", "activity"])
def test_feature_examples_are_real_inputs(task, tmp_path, models):
    from pipeline.tracking import _signature_and_example

    schema, example = _signature_and_example(save_model(tmp_path / task, task))
    assert schema is None  # MLflow's tensor schema would refuse float64 and series of different lengths
    out = models[task].predict(None, example)
    assert len(out) == 2 and np.isfinite(np.nan_to_num(example, nan=0.0)).all()
    if task == "digits":
        assert example.shape == (2, 28, 28) and 0 <= example.min() and example.max() == 1.0
        assert (example > 0).mean() > 0.05  # an image, not zeros
    else:
        lengths = out["length"].tolist()
        assert lengths[0] != lengths[1] and np.isnan(example[1, lengths[1]:]).all()
        assert not np.isnan(example[0, : lengths[0]]).any() and np.std(example[0, : lengths[0]]) > 0


def test_requirements_are_pinned_and_hold_what_serving_imports(tmp_path):
    from importlib.metadata import version

    from pipeline.tracking import PIP_REQUIREMENTS, pip_requirements

    pinned = pip_requirements()
    assert [r.split("==")[0] for r in pinned] == PIP_REQUIREMENTS
    for requirement in pinned:
        name, wanted = requirement.split("==")
        assert version(name).split("+")[0] == wanted
    folders = [str(save_model(tmp_path / t, t)) for t in ("charlm", "sentiment", "translation", "gesture")]
    script = (
        "import sys, numpy as np, pandas as pd\n"
        "from pipeline.pyfunc_model import RNNPyfunc\n"
        "inputs = [pd.DataFrame({'prime': ['The ']}), pd.DataFrame({'text': ['a film']}),\n"
        "          pd.DataFrame({'text': ['forty-two']}), np.ones((1, 20))]\n"
        "for folder, x in zip(sys.argv[1:], inputs):\n"
        "    m = RNNPyfunc(); m.load_context(type('C', (), {'artifacts': {'model': folder}})()); m.predict(None, x)\n"
        "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))\n")
    done = subprocess.run([sys.executable, "-c", script, *folders], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    modules = set(done.stdout.split())
    assert {"torch", "lightning", "mlflow", "numpy", "pandas", "safetensors", "pydantic", "yaml"} <= modules
    # the data sources and DVC stay out (matplotlib may come in: torchmetrics, under Lightning, imports it)
    assert not modules & {"aeon", "mlxtend", "music21", "num2words", "dvc", "scattertext", "sklearn"}, modules
