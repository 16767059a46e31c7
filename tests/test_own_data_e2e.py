"""A user's own files through the CLI, as a user runs it: a text file, a CSV of texts, a TSV of pairs and a
tabular CSV under data/own/, declared in params.yaml only, go through `python -m pipeline prepare, train,
evaluate, register`, then `sample`/`predict` and `mlflow.pyfunc.load_model("models:/<task>@champion")`.

The work folder is a temporary folder holding params.yaml, data/own/ and the MLflow store; the package is this
checkout's (PYTHONPATH). Each stage is a fresh process importing torch, Lightning and MLflow: about 2 minutes
on 2 cores in all, hence `slow`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

TINY_TRAIN = {"batch_size": 16, "max_epochs": 2, "lr": 0.01}
TASKS = {
    "mytext": {"topology": "char_lm", "data": {"source": "my.txt"},
               "model": {"hidden_size": 16, "embedding_dim": 8}, "train": {**TINY_TRAIN, "block_size": 16}},
    "reviews": {"topology": "many_to_one",
                "data": {"source": "reviews.csv", "text_column": "review", "label_column": "stars", "min_count": 1},
                "model": {"hidden_size": 16, "embedding_dim": 8}, "train": TINY_TRAIN},
    "phrases": {"topology": "seq2seq", "data": {"source": "pairs.tsv"},
                "model": {"hidden_size": 16, "embedding_dim": 8}, "train": TINY_TRAIN},
    "churn": {"topology": "one_to_one", "data": {"source": "churn.csv", "label_column": "churned"},
              "model": {"hidden_size": 16}, "train": TINY_TRAIN},
}


def write_own_files(own: Path) -> None:
    rng = np.random.default_rng(0)
    own.mkdir(parents=True)
    (own / "my.txt").write_text("".join(f"Verse {i}: the rain in Spain stays mainly in the plain.\n"
                                        for i in range(80)))
    good, bad = ["great", "lovely", "superb"], ["dull", "awful", "boring"]
    rows = ["review,stars"] + [f'"a {rng.choice(good if i % 2 else bad)} film, truly",{5 if i % 2 else 1}'
                               for i in range(80)]
    (own / "reviews.csv").write_text("\n".join(rows) + "\n")
    words = ["one", "two", "three", "four", "five"]
    lines = []
    for _ in range(80):
        w = rng.choice(words, 3).tolist()
        lines.append(" ".join(w) + "\t" + " ".join(reversed(w)))
    (own / "pairs.tsv").write_text("\n".join(lines) + "\n")
    x = rng.normal(size=(100, 3)) * [1, 10, 100]
    rows = ["age,tenure,spend,churned"] + [f"{a:.3f},{b:.3f},{c:.3f},{'yes' if a > 0 else 'no'}" for a, b, c in x]
    (own / "churn.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own")
    write_own_files(root / "data" / "own")
    params = {"seed": 7, "tasks": list(TASKS),
              "trainer": {"accelerator": "cpu", "devices": 1},
              "tracking": {"uri": "sqlite:///mlflow.db", "artifact_location": "mlruns", "experiment": "own"},
              **TASKS}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def cli(work: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=work, env=env, text=True,
                          capture_output=True, timeout=600)
    if ok:
        assert proc.returncode == 0, f"{args}: {proc.stderr[-3000:]}"
    return proc


def test_own_files_prepare_train_evaluate_register_and_serve(work, monkeypatch):
    for task in TASKS:
        for stage in ("prepare", "train", "evaluate"):
            cli(work, stage, task)
        manifest = json.loads((work / "data" / "prepared" / task / "manifest.json").read_text())
        assert manifest["source"]["path"] == TASKS[task]["data"]["source"]
        assert len(manifest["source"]["sha256"]) == 64
        assert json.loads((work / "metrics" / f"{task}.json").read_text())  # the key metric first, numbers
    cli(work, "register")

    text = cli(work, "sample", "--model-uri", "models:/mytext@champion", "--prime", "Verse", "--length", "30",
               "--seed", "1").stdout
    assert text.startswith("Verse") and len(text.rstrip("\n")) >= 30

    import mlflow
    import pandas as pd

    # set_tracking_uri also exports MLFLOW_TRACKING_URI: restore both, or later tests read this store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    reviews = mlflow.pyfunc.load_model("models:/reviews@champion").predict(
        pd.DataFrame({"text": ["a lovely film", "a boring film"]}))
    assert set(reviews["label"]) <= {"1", "5"}
    phrases = mlflow.pyfunc.load_model("models:/phrases@champion").predict(pd.DataFrame({"text": ["one two"]}))
    assert isinstance(phrases["translation"][0], str)
    churn = mlflow.pyfunc.load_model("models:/churn@champion").predict(
        pd.DataFrame({"age": [2.0, -2.0], "tenure": [1.0, 1.0], "spend": [0.0, 0.0]}))
    assert set(churn["label"]) <= {"no", "yes"}


def test_a_bad_file_is_one_line_and_leaves_the_prepared_data(work):
    prepared = work / "data" / "prepared" / "churn"
    if not prepared.exists():
        cli(work, "prepare", "churn")
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    path = work / "data" / "own" / "churn.csv"
    good = path.read_text()
    try:
        path.write_text(good + "1.0,high,3.0,yes\n")
        proc = cli(work, "prepare", "churn", ok=False)
        line = len(good.splitlines()) + 1
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            f"error: data/own/churn.csv: column 'tenure', line {line}: 'high' is not a finite number (features must "
            "be numbers: fix the cell, or list the others in data.feature_columns)"]
        assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before
    finally:
        path.write_text(good)
