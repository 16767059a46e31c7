"""The CLI's promise for bad input: exit code 2, one line on stderr that starts with `error:` and names the
problem, no traceback, and the earlier outputs (data, models, checkpoints, metrics, the MLflow store) as
they were. Each case runs in a working folder that holds real outputs of a tiny digits run to protect.

Most problems are caught while params.yaml is parsed, before any stage module is imported: those run
through `pipeline.__main__.main` in this process, against every stage; a representative few, and the
ones found later (the batch split over devices, a missing data folder), also run as real processes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  imported here, not under capsys: their log handlers keep the
import mlflow  # noqa: F401  stream they first see, and a test's captured stream is closed after it
import pytest
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
                                  ["prepare", "digits", "--nope"], ["prepare", "digits", "extra"]])
def test_bad_command_lines_are_usage_errors(argv, inside, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert "usage:" in capsys.readouterr().err


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
        assert proc.returncode == 2 and "usage:" in proc.stderr and "Traceback" not in proc.stderr, args
    proc = pipeline_cli(["prepare", "poetry"], workdir)
    assert proc.returncode == 2
    assert "unknown task 'poetry'" in one_error_line(proc.stderr)
