"""The CLI's promise for bad input: exit code 2, one line on stderr that starts with `error:` and names the
problem, no traceback, and the earlier outputs (data, models, checkpoints, metrics, the MLflow store) as
they were. Each case runs in a working folder that holds real outputs of a tiny digits run to protect.

Most problems are caught while params.yaml is parsed, before any stage module is imported: those run
through `pipeline.__main__.main` in this process, against every stage; a representative few, and the
ones found later (the batch split over devices, a missing data folder), also run as real processes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  imported here, not under capsys: their log handlers keep the
import mlflow  # noqa: F401  stream they first see, and a test's captured stream is closed after it
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.__main__ import main

REPO = Path(__file__).resolve().parents[1]
STAGES = [["prepare", "digits"], ["train", "digits"], ["evaluate", "digits"], ["register"], ["longrange"]]

GOOD = {
    "seed": 5,
    "tasks": ["digits"],
    "trainer": {"accelerator": "cpu", "devices": 1},
    "longrange": {"gaps": [3], "train_samples": 32, "test_samples": 16, "hidden_size": 8, "batch_size": 16,
                  "max_epochs": 1},
    "digits": {"data": {"max_samples": 150, "val_fraction": 0.2, "test_fraction": 0.2},
               "model": {"hidden_size": 8},
               "train": {"batch_size": 16, "max_epochs": 1}},
}


def env_for(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", DVC_NO_ANALYTICS="1",
               **extra)
    return env


def pipeline_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env_for(), capture_output=True,
                          text=True, timeout=timeout)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: kind, size, mtime and content hash."""
    state = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        state[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return state


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working folder after prepare, train, evaluate and register of a tiny digits run (one process)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "params.yaml").write_text(yaml.safe_dump(GOOD))
    script = ("import sys; from pipeline.__main__ import main\n"
              "for args in (['prepare', 'digits'], ['train', 'digits'], ['evaluate', 'digits'], ['register']):\n"
              "    assert main(args) == 0, args\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env_for(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for made in ("data/prepared/digits/manifest.json", "models/digits/weights.safetensors",
                 "checkpoints/digits/last.ckpt", "metrics/digits.json", "registry/digits.json", "mlflow.db"):
        assert (root / made).is_file(), made
    return root


@pytest.fixture
def inside(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = snapshot(workdir)
    yield workdir
    assert snapshot(workdir) == before, "a failed command changed the working folder"


def one_error_line(err: str, alone: bool = True) -> str:
    """The one `error:` line of stderr; `alone`: nothing else on stderr, else it is the last line (a stage
    that got as far as building the Lightning trainer has printed Lightning's INFO lines before it)."""
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    assert "Traceback" not in err
    if alone:
        assert len(lines) == 1, err[-3000:]
    return errors[0]


def call(capsys, argv: list[str], alone: bool = True) -> str:
    """main(argv) in this process: exit code 2 and one error line (returned); nothing on stdout if `alone`."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, out[-2000:], err[-2000:])
    if alone:
        assert out == "", out[-2000:]
    return one_error_line(err, alone)


# (params.yaml text, a fragment the error line must hold): all caught while parsing, before any work
BAD_PARAMS = {
    "seed_not_int": ("seed: abc\n", "seed"),
    "seed_fraction": ("seed: 1.5\n", "seed"),
    "tasks_not_list": ("tasks: digits\n", "tasks"),
    "tasks_empty": ("tasks: []\n", "task list is empty"),
    "task_unknown": ("tasks: [digits, poetry]\n", "tasks.1"),
    "task_twice": ("tasks: [digits, digits]\n", "listed twice"),
    "unknown_top_key": ("seed: 1\nbogus: 1\n", "bogus"),
    "unknown_trainer_key": ("trainer: {gpus: 1}\n", "trainer.gpus"),
    "unknown_strategy": ("trainer: {strategy: ddpx}\n", "unknown strategy 'ddpx'"),
    "zero_devices": ("trainer: {devices: 0}\n", "trainer.devices"),
    "negative_devices": ("trainer: {devices: -2}\n", "trainer.devices"),
    "zero_nodes": ("trainer: {num_nodes: 0}\n", "trainer.num_nodes"),
    "precision_not_str": ("trainer: {precision: 16}\n", "trainer.precision"),
    "unknown_tracking_key": ("tracking: {url: sqlite:///x.db}\n", "tracking.url"),
    "gaps_empty": ("longrange: {gaps: []}\n", "gaps"),
    "gap_negative": ("longrange: {gaps: [5, -1]}\n", "gaps"),
    "longrange_hidden_negative": ("longrange: {hidden_size: -4}\n", "longrange.hidden_size"),
    "negative_samples": ("digits: {data: {max_samples: -5}}\n", "digits.data.max_samples"),
    "fraction_one": ("digits: {data: {val_fraction: 1.0}}\n", "digits.data.val_fraction"),
    "fractions_leave_nothing": ("digits: {data: {val_fraction: 0.5, test_fraction: 0.45}}\n", "digits.data"),
    "unknown_data_key": ("digits: {data: {max_sample: 10}}\n", "digits.data.max_sample"),
    "unknown_model_key": ("digits: {model: {hiden_size: 3}}\n", "digits.model.hiden_size"),
    "zero_hidden": ("digits: {model: {hidden_size: 0}}\n", "digits.model.hidden_size"),
    "dropout_above_one": ("digits: {model: {dropout: 1.5}}\n", "digits.model.dropout"),
    "negative_batch": ("digits: {train: {batch_size: -64}}\n", "digits.train.batch_size"),
    "lr_not_number": ("digits: {train: {lr: fast}}\n", "digits.train.lr"),
    "epochs_fraction": ("digits: {train: {max_epochs: 2.5}}\n", "digits.train.max_epochs"),
    "charlm_too_short": ("charlm: {data: {max_chars: 10}}\n", "charlm.data.max_chars"),
    "melody_wrong_type": ("melody: {data: {max_pieces: many}}\n", "melody.data.max_pieces"),
    "unknown_task_section_key": ("sentiment: {extra: {}}\n", "sentiment.extra"),
    "section_not_mapping": ("gesture: 7\n", "gesture"),
    "top_level_list": ("- 1\n- 2\n", "top level must be a mapping"),
    "top_level_string": ("just some words\n", "top level must be a mapping"),
    "empty_file": ("", "empty"),
    "comments_only": ("# seed: 1\n", "empty"),
    "broken_yaml": ("seed: [1, 2\ntasks: x\n", "not valid YAML"),
    "tab_indent": ("trainer:\n\tdevices: 1\n", "not valid YAML"),
    "not_text": (b"\xff\xfe\x00\x81seed", "not valid YAML"),
}


def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / f"{name}.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("name", list(BAD_PARAMS))
def test_bad_params_stop_every_stage_with_one_line(name, inside, capsys, tmp_path):
    content, fragment = BAD_PARAMS[name]
    path = write(tmp_path, name, content)
    for stage in STAGES:
        line = call(capsys, ["--params", str(path), *stage])
        assert fragment in line and str(path) in line, (stage, line)


def test_missing_params_file(inside, capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    for stage in STAGES:
        assert "params file not found" in call(capsys, ["--params", str(missing), *stage])


def good_with(**sections) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


# found by the train stage: Lightning's own checks, and the global batch split over the devices
TRAINER_PROBLEMS = {
    "batch_not_divisible": ({"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}, 15,
                            "digits.train.batch_size 15 is not divisible by the 2 devices"),
    "unknown_accelerator": ({"accelerator": "banana"}, 16, "invalid accelerator name"),
    "unknown_precision": ({"precision": "17"}, 16, "Precision '17' is invalid"),
    "devices_not_a_count": ({"accelerator": "cpu", "devices": "two"}, 16, "`devices` selected with"),
}


@pytest.mark.parametrize("name", list(TRAINER_PROBLEMS))
def test_trainer_problems_stop_train_before_any_checkpoint_or_run(name, inside, capsys, tmp_path):
    trainer, batch, fragment = TRAINER_PROBLEMS[name]
    raw = good_with(trainer=trainer)
    raw["digits"]["train"]["batch_size"] = batch
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert fragment in call(capsys, ["--params", str(path), "train", "digits"], alone=False)


def test_unknown_task(inside, capsys, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    for stage in ("prepare", "train", "evaluate"):
        assert "unknown task 'poetry'" in call(capsys, ["--params", str(path), stage, "poetry"])
    assert "not in params.yaml's task list" in call(capsys, ["--params", str(path), "train", "melody"], alone=False)


def test_unreachable_tracking_store(inside, capsys, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(good_with(tracking={"uri": "http://127.0.0.1:9"})))
    for stage in (["train", "digits"], ["register"]):
        line = call(capsys, ["--params", str(path), *stage], alone=False)
        assert "http://127.0.0.1:9" in line and "unreachable" in line


@pytest.mark.parametrize("argv", [[], ["train"], ["bogus"], ["--nope", "prepare", "digits"],
                                  ["prepare", "digits", "--nope"], ["prepare", "digits", "extra"],
                                  ["sample", "--length", "abc"], ["sample", "--temperature", "warm"],
                                  ["predict", "digits", "x.npy", "--top-k", "1.5"], ["predict"]])
def test_bad_command_lines_are_one_line_usage_errors(argv, inside, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--help`)" in line


def test_missing_inputs_name_the_missing_path(tmp_path, capsys, monkeypatch):
    """A fresh folder: train before prepare, evaluate before train, register before evaluate."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(GOOD))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert "models/digits: no trained model" in call(capsys, ["evaluate", "digits"])
    assert "no metrics for digits" in call(capsys, ["register"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]

    proc = pipeline_cli(["train", "digits"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr, alone=False)
    assert "data/prepared/digits" in line and "prepare@digits" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no checkpoints, no MLflow store


# --- real processes: a representative few -------------------------------------------------------

SUBPROCESS_CASES = {
    "broken_yaml/prepare": ("seed: [1, 2\n", ["prepare", "digits"], "not valid YAML"),
    "unknown_nested_key/train": ("digits: {model: {hiden_size: 3}}\n", ["train", "digits"], "digits.model.hiden_size"),
    "top_level_list/evaluate": ("- 1\n", ["evaluate", "digits"], "top level must be a mapping"),
    "empty_tasks/register": ("tasks: []\n", ["register"], "task list is empty"),
    "negative_gap/longrange": ("longrange: {gaps: [-5]}\n", ["longrange"], "gaps"),
    "batch_not_divisible/train": (yaml.safe_dump(good_with(trainer={"devices": 2, "strategy": "ddp_spawn"}) | {
        "digits": {**GOOD["digits"], "train": {"batch_size": 15, "max_epochs": 1}}}), ["train", "digits"],
        "batch_size 15 is not divisible by the 2 devices"),
}


@pytest.mark.parametrize("name", list(SUBPROCESS_CASES))
def test_bad_params_through_a_real_process(name, workdir, tmp_path):
    content, stage, fragment = SUBPROCESS_CASES[name]
    path = tmp_path / "params.yaml"
    path.write_text(content)
    before = snapshot(workdir)
    proc = pipeline_cli(["--params", str(path), *stage], workdir)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    failed_parsing = "train" not in stage  # else Lightning's INFO lines come first
    assert fragment in one_error_line(proc.stderr, alone=failed_parsing)
    if failed_parsing:
        assert proc.stdout == ""
    assert snapshot(workdir) == before


def test_usage_and_unknown_task_through_a_real_process(workdir):
    for args in (["bogus"], ["train"], ["--nope", "longrange"]):
        proc = pipeline_cli(args, workdir)
        assert proc.returncode == 2 and "--help" in one_error_line(proc.stderr), args
    proc = pipeline_cli(["prepare", "poetry"], workdir)
    assert proc.returncode == 2
    assert "unknown task 'poetry'" in one_error_line(proc.stderr)


# --- the serving commands: sample and predict -------------------------------------------------------------


def test_help_lists_every_option_with_its_default(capsys):
    from pipeline.__main__ import _parser

    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for stage, parser in subparsers.choices.items():
        with pytest.raises(SystemExit) as stop:
            main([stage, "--help"])
        assert stop.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        for action in options:
            assert action.option_strings[-1] in text, (stage, action.dest)
        assert text.count("(default: ") == len(options), (stage, text)
    text = " ".join(_parser().format_help().split())
    assert "--params PARAMS params file (default: params.yaml)" in text


@pytest.fixture(scope="module")
def served_models(workdir):
    """Random-weight melody, gesture and charlm models registered next to the tiny digits model (version 1 of
    each, champion): what `sample` and `predict` check does not depend on training."""
    from mlflow.tracking import MlflowClient
    from test_serving import save_model

    from pipeline import tracking
    from pipeline.config import load_params

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        params = load_params("params.yaml")
        client = MlflowClient(tracking.tracking_uri(params))
        for task in ("melody", "gesture", "charlm"):
            folder = save_model(workdir / "served" / task, task)
            run = client.create_run(tracking.experiment_id(params))
            version = tracking.log_and_register(params, task, folder, run.info.run_id, root=workdir)
            client.set_terminated(run.info.run_id)
            client.set_registered_model_alias(task, "champion", version)
    return workdir


@pytest.fixture
def serving(served_models, monkeypatch):
    monkeypatch.chdir(served_models)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return served_models


def registered(task: str):

    from pipeline import tracking
    from pipeline.config import load_params

    with tracking.mlflow_uri(tracking.tracking_uri(load_params("params.yaml"))):
        return mlflow.pyfunc.load_model(f"models:/{task}/1")


def run_ok(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    return capsys.readouterr().out


def test_predict_digits_from_files_holding_one_or_several_images(serving, capsys, tmp_path):
    x = np.load(serving / "data/prepared/digits/test.npz")["x"][:5]
    np.save(tmp_path / "three.npy", x[:3])
    np.save(tmp_path / "one.npy", x[3])
    np.save(tmp_path / "flat.npy", x[4].reshape(784).astype(np.float64))
    out = run_ok(capsys, ["predict", "digits", str(tmp_path / "three.npy"), str(tmp_path / "one.npy"),
                          str(tmp_path / "flat.npy")])
    expected = registered("digits").predict(x)
    assert out == expected.to_string(index=False) + "\n"


def test_predict_gesture_files_of_different_lengths(serving, capsys, tmp_path):
    rng = np.random.default_rng(0)
    series = [rng.normal(size=n) for n in (60, 150, 90, 33)]
    np.save(tmp_path / "a.npy", series[0])
    np.save(tmp_path / "b.npy", series[1][:, None])  # (T, 1)
    stack = np.full((2, 90), np.nan)  # two more, NaN-padded the UCR way
    stack[0], stack[1, :33] = series[2], series[3]
    np.save(tmp_path / "stack.npy", stack)
    out = run_ok(capsys, ["predict", "gesture", *(str(tmp_path / f) for f in ("a.npy", "b.npy", "stack.npy"))])
    model = registered("gesture")
    alone = pd.concat([model.predict(s[None]) for s in series], ignore_index=True)
    assert out == alone.to_string(index=False) + "\n"
    assert alone["length"].tolist() == [60, 150, 90, 33]


def test_predict_melody_takes_sampling_options(serving, capsys):
    out = run_ok(capsys, ["predict", "melody", "C5|1.0", "--temperature", "0", "--length", "6"])
    net = registered("melody").unwrap_python_model().model
    tokens = net.vocab["tokens"]
    greedy = " ".join(["C5|1.0"] + [tokens[i] for i in net.generate(torch.tensor([[2]]), 6, 0.0)[0]])
    assert greedy in out
    seeded = ["predict", "melody", "D5|1.0", "--seed", "4", "--top-k", "3"]
    assert run_ok(capsys, seeded) == run_ok(capsys, seeded)


def test_sample_takes_a_seed(serving, capsys):
    argv = ["sample", "--prime", "The ", "--length", "30", "--seed", "9", "--model-uri", "models:/charlm/1"]
    out = run_ok(capsys, argv)
    assert out == registered("charlm").unwrap_python_model().model.sample("The ", 30, 0.8, seed=9) + "\n"


SERVING_ERRORS = {
    "sample_on_digits": (["sample", "--model-uri", "models:/digits@champion"], "not a char LM"),
    "sample_on_gesture": (["sample", "--model-uri", "models:/gesture/1"], "'gesture' model, not a char LM"),
    "sample_length_negative": (["sample", "--length", "-5"], "--length: -5 is out of range"),
    "sample_length_above_cap": (["sample", "--length", "100000"], "--length: 100000 is out of range"),
    "sample_temperature_nan": (["sample", "--temperature", "nan"], "--temperature: expected a finite number"),
    "sample_temperature_inf": (["sample", "--temperature", "inf"], "--temperature: expected a finite number"),
    "sample_top_k_zero": (["sample", "--top-k", "0"], "--top-k: 0 is out of range"),
    "sample_unknown_characters": (["sample", "--model-uri", "models:/charlm/1", "--prime", "\u00e9t\u00e9"],
                                  "characters the model does not know"),
    "melody_malformed_seed": (["predict", "melody", "C4"], "unknown seed note 'C4'; a note is pitch|quarter-length"),
    "melody_bad_temperature": (["predict", "melody", "C5|1.0", "--temperature", "-1"], "--temperature"),
    "digits_missing_file": (["predict", "digits", "nope.npy"], "nope.npy: no such file"),
    "digits_not_npy": (["predict", "digits", "a picture of a seven"], "digits takes .npy files"),
    "digits_sampling_option": (["predict", "digits", "x.npy", "--temperature", "0.5"],
                               "--temperature: only for generators"),
    "wrong_model_for_task": (["predict", "gesture", "x.npy", "--model-uri", "models:/digits@champion"],
                             "is the 'digits' model, not 'gesture'"),
    "unknown_task": (["predict", "poetry", "x"], "unknown task 'poetry'"),
}


@pytest.mark.parametrize("name", list(SERVING_ERRORS))
def test_serving_command_errors_are_one_line(name, serving, capsys, tmp_path):
    argv, fragment = SERVING_ERRORS[name]
    assert fragment in call(capsys, argv)


def test_bad_npy_files_are_one_line(serving, capsys, tmp_path):
    np.save(tmp_path / "shape.npy", np.zeros((3, 5)))
    (tmp_path / "broken.npy").write_bytes(b"not an array")
    np.save(tmp_path / "values.npy", np.full((28, 28), 255.0))
    for path, fragment in (("shape.npy", "shape (3, 5) is not one image"), ("broken.npy", "not a readable .npy"),
                           ("values.npy", "pixel values must lie in [0, 1]")):
        assert fragment in call(capsys, ["predict", "digits", str(tmp_path / path)])
    np.save(tmp_path / "inside.npy", np.array([1.0, np.nan, 2.0]))
    assert "NaN at step 1" in call(capsys, ["predict", "gesture", str(tmp_path / "inside.npy")])
