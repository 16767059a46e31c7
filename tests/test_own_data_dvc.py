"""A user's own text files as tasks, end to end through the real clients: no code change, only params.yaml
sections and files under data/own/. `dvc repro` prepares, trains, evaluates and registers them; the CLI samples
from `models:/<task>@champion`; editing one file reruns that task's stages only (and register).

Runs in a committed copy of this repository (as tests/test_e2e.py) with two tiny char LM tasks; about 2 min
on 2 cores, most of it processes importing torch, Lightning and MLflow.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from test_e2e import BIN, clean_env, copy_repo, dvc_status, sh, stages_run

pytestmark = pytest.mark.slow

pytest.importorskip("pipeline.datasets.files")

WORDS = ["the", "river", "runs", "under", "a", "quiet", "bridge", "and", "light", "falls", "on", "stone"]


def text(seed: int, chars: int) -> str:
    """A deterministic English-like text of about `chars` characters (lines of 4-9 words)."""
    lines, state = [], seed
    while sum(len(line) + 1 for line in lines) < chars:
        state = (state * 1103515245 + 12345) % 2**31
        words = [WORDS[(state >> (3 * k)) % len(WORDS)] for k in range(4 + state % 6)]
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines) + "\n"


def tiny(task_files: dict[str, str]) -> dict:
    section = lambda source: {"topology": "char_lm", "data": {"source": source, "val_fraction": 0.1},  # noqa: E731
                              "model": {"hidden_size": 16, "embedding_dim": 8},
                              "train": {"batch_size": 16, "max_epochs": 1, "block_size": 32, "lr": 0.01}}
    return {"seed": 5, "tasks": list(task_files),
            "trainer": {"accelerator": "cpu", "devices": 1},
            "tracking": {"uri": "sqlite:///mlflow.db", "artifact_location": "mlruns", "experiment": "rnn-pipeline"},
            "longrange": {"gaps": [5], "vocab_size": 4, "train_samples": 64, "test_samples": 32, "hidden_size": 8,
                          "batch_size": 32, "max_epochs": 1, "lr": 0.01},
            **{task: section(source) for task, source in task_files.items()}}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("own") / "repo"
    root.mkdir()
    copy_repo(root)
    (root / "data" / "own" / "my.txt").write_text(text(1, 12_000))
    (root / "data" / "own" / "poems").mkdir()
    for k in range(3):  # a folder of .txt files is one text
        (root / "data" / "own" / "poems" / f"part{k}.txt").write_text(text(10 + k, 4_000))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny({"mytext": "my.txt", "poems": "poems"}), sort_keys=False))
    git = ["git", "-c", "user.name=own", "-c", "user.email=own@example.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "own data"], cwd=root, check=True)
    env = clean_env(root, DVC_SITE_CACHE_DIR=str(root.parent / "dvc-site-cache"), OMP_NUM_THREADS="1")
    out = sh([str(BIN / "dvc"), "repro"], root, env, timeout=900).stdout
    return root, env, out


def test_own_files_go_through_every_stage(repo):
    root, env, out = repo
    ran = set(stages_run(out))
    assert {f"{s}@{t}" for s in ("sources", "prepare", "train", "evaluate") for t in ("mytext", "poems")} | {
        "register"} <= ran, out[-3000:]
    for task in ("mytext", "poems"):
        metrics = json.loads((root / "metrics" / f"{task}.json").read_text())
        assert next(iter(metrics)) == "loss" and metrics["loss"] < metrics["baseline"]["loss"] * 1.5
        source = json.loads((root / "data" / "sources" / f"{task}.json").read_text())
        assert source["topology"] == "char_lm" and not source["builtin"] and source["files"]
        receipt = json.loads((root / "registry" / f"{task}.json").read_text())
        assert receipt["alias"] == "champion" and receipt["key_metric"] == "loss"
    assert len(json.loads((root / "data" / "sources" / "poems.json").read_text())["files"]) == 3
    assert dvc_status(root, env) == {}


def test_the_cli_samples_from_the_registered_model(repo):
    root, env, _ = repo
    cli = [str(BIN / "python"), "-m", "pipeline"]
    first = sh([*cli, "sample", "--model-uri", "models:/mytext@champion", "--prime", "The river", "--length", "40",
                "--seed", "3"], root, env).stdout.strip().splitlines()[-1]
    again = sh([*cli, "sample", "--model-uri", "models:/mytext@champion", "--prime", "The river", "--length", "40",
                "--seed", "3"], root, env).stdout.strip().splitlines()[-1]
    assert first == again and first.startswith("The river") and len(first) >= len("The river")
    assert set(first) <= set(text(1, 12_000))  # the model only knows the file's characters
    default = sh([*cli, "sample", "--model-uri", "models:/poems@champion", "--length", "10", "--seed", "1"], root,
                 env).stdout  # no --prime: "ROMEO:" is not in this text, so it starts from a letter it knows
    assert "error" not in default
    refused = sh([*cli, "sample", "--model-uri", "models:/mytext@champion", "--prime", "ROMEO:"], root, env, ok=False)
    assert refused.returncode == 2 and re.search(r"characters the model does not know: '[MOER:]+'",
                                                 refused.stdout), refused.stdout[-2000:]


def test_editing_one_file_reruns_only_its_task(repo):
    root, env, _ = repo
    path: Path = root / "data" / "own" / "poems" / "part1.txt"
    path.write_text(path.read_text() + text(99, 500))
    status = dvc_status(root, env)
    assert set(status) <= {"sources@mytext", "sources@poems"}, status  # only the cheap hashing sees data/own
    out = sh([str(BIN / "dvc"), "repro"], root, env, timeout=900).stdout
    ran = stages_run(out)
    assert [s for s in ran if not s.startswith("sources@")] == ["prepare@poems", "train@poems", "evaluate@poems",
                                                                "register"], out[-3000:]
    assert dvc_status(root, env) == {}
