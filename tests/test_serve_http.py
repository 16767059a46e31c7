"""`mlflow models serve --env-manager local` on real registered models, driven over HTTP as a user does.

Tiny sentiment, translation and charlm models are trained (tracked) and registered in a temporary store; one
server per model starts in its own process group, all three at once (start-up is mostly imports: ~40 s each
alone here). Each documented payload format (dataframe_split, dataframe_records, inputs, instances, CSV) must
give what the same registered model gives in process; each bad payload a 400 whose body is one JSON line with
a one-line message and no stack trace. A generation at the length cap finishes within the timeout, and one
SIGTERM to the process group stops a server.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from tiny import tiny_raw_params

from pipeline import tracking
from pipeline.config import parse_params
from pipeline.serving_defaults import MAX_CHARS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TASKS = ("sentiment", "translation", "charlm")
TINY_SENTIMENT = {"data": {"max_samples": 800}, "model": {"hidden_size": 16, "embedding_dim": 8},
                  "train": {"max_epochs": 1, "batch_size": 32}}
START_TIMEOUT = 300  # seconds for a server to answer /ping (about 40 s alone on a 2-core machine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body, content_type: str = "application/json", timeout: float = 120) -> tuple[int, str]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    data = data.encode() if isinstance(data, str) else data
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def predictions(status: int, text: str) -> list:
    assert status == 200, text[-2000:]
    return json.loads(text)["predictions"]


def refused(status: int, text: str, fragment: str | None = None, one_line: bool = True) -> str:
    """A 400 with a JSON body, no Python stack trace; the message (one line unless MLflow's own parser
    refused the payload before predict) holds `fragment`."""
    assert status == 400, (status, text[-2000:])
    body = json.loads(text)
    assert "stack_trace" not in body and "Traceback" not in text and 'File "' not in text, text[-3000:]
    message = body["message"]
    if one_line:
        assert "\n" not in message and len(message) < 300, message
    if fragment is not None:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """{task: SimpleNamespace(port, model (the registered model loaded in process))} for three live servers."""
    import mlflow

    from pipeline.prepare import prepare
    from pipeline.train import train

    tmp = tmp_path_factory.mktemp("serve")
    raw = tiny_raw_params(tmp) | {"tasks": list(TASKS), "sentiment": TINY_SENTIMENT}
    params = parse_params(raw)
    uri = f"sqlite:///{tmp}/mlflow.db"
    threads = torch.get_num_threads()
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        torch.set_num_threads(1)
        for task in TASKS:
            prepare(task, params, tmp / "data")
            train(task, params, data_root=tmp / "data", models_root=tmp / "models", ckpt_root=tmp / "ckpt", root=REPO)
            run_id = json.loads((tmp / "models" / task / "config.json").read_text())["mlflow_run_id"]
            assert tracking.log_and_register(params, task, tmp / "models" / task, run_id, root=REPO) == "1"
        torch.set_num_threads(threads)
        built = time.monotonic()
        venv = str(Path(sys.executable).parent)  # mlflow runs `uvicorn` from PATH, as in an activated venv
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
            "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "PATH": f"{venv}{os.pathsep}{os.environ.get('PATH', '')}"}
        servers, mlflow_cli = {}, Path(sys.executable).with_name("mlflow")
        try:
            for task in TASKS:
                port, log = free_port(), tmp / f"{task}.log"
                cmd = [str(mlflow_cli), "models", "serve", "-m", f"models:/{task}/1", "--env-manager", "local",
                       "-h", "127.0.0.1", "-p", str(port)]
                with open(log, "wb") as out:
                    process = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True)
                with tracking.mlflow_uri(uri):
                    model = mlflow.pyfunc.load_model(f"models:/{task}/1")
                servers[task] = SimpleNamespace(port=port, process=process, log=log, model=model)
            for task, server in servers.items():
                while True:
                    assert server.process.poll() is None, server.log.read_text()[-3000:]
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/ping", timeout=2) as r:
                            if r.status == 200:
                                break
                    except OSError:
                        pass
                    assert time.monotonic() - built < START_TIMEOUT, f"{task} server not up in {START_TIMEOUT} s"
                    time.sleep(0.5)
            up = time.monotonic()
            print(f"\nserve fixture: models built in {built - started:.0f} s, 3 servers up in {up - built:.0f} s")
            yield servers
        finally:
            for server in servers.values():
                stop(server)


def stop(server) -> float:
    """One SIGTERM to the server's process group; the seconds it took to exit (SIGKILL only as a last resort,
    which fails the check in test_one_signal_stops_the_server)."""
    if server.process.poll() is not None:
        return 0.0
    start = time.monotonic()
    os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=30)
        return math.inf
    return time.monotonic() - start


def records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))  # None -> null, as the server writes it


def same(got: list[dict], expected: list[dict], name: str) -> None:
    assert len(got) == len(expected), name
    for g, e in zip(got, expected):
        assert g.keys() == e.keys(), name
        for key in e:
            if isinstance(e[key], float):
                assert g[key] == pytest.approx(e[key], abs=1e-6), (name, key)
            else:
                assert g[key] == e[key], (name, key)


def formats(frame: pd.DataFrame) -> dict[str, tuple[object, str]]:
    """The same rows in every payload format the scoring server documents."""
    rows = frame.to_dict("records")
    return {
        "dataframe_split": ({"dataframe_split": frame.to_dict(orient="split")}, "application/json"),
        "dataframe_records": ({"dataframe_records": rows}, "application/json"),
        "inputs": ({"inputs": frame.to_dict(orient="list")}, "application/json"),
        "instances": ({"instances": rows}, "application/json"),
        "csv": (frame.to_csv(index=False), "text/csv"),
    }


# --- sentiment ------------------------------------------------------------------------------------------


def test_sentiment_every_format_and_honest_rows(served):
    server = served["sentiment"]
    texts = pd.DataFrame({"text": ["a gripping, beautifully acted film", "dull and lifeless", "qqxv zzkw"]})
    expected = records(server.model.predict(texts))
    assert expected[2]["label"] is None and expected[2]["unknown_share"] == 1.0  # nothing known: no label
    assert expected[0]["label"] in ("fresh", "rotten") and 0 <= expected[0]["unknown_share"] < 1
    for name, (body, content_type) in formats(texts).items():
        same(predictions(*post(server.port, body, content_type)), expected, name)
    empty = predictions(*post(server.port, {"dataframe_records": [{"text": ""}]}))
    assert empty == [{"label": None, "probability": None, "unknown_share": 0.0}]
    assert predictions(*post(server.port, {"dataframe_split": {"columns": ["text"], "data": []}})) == []


@pytest.mark.parametrize("body, fragment", [
    ({"dataframe_records": [{"text": "fine"}, {"text": None}]}, "row 1, column 'text': missing"),
    ({"dataframe_split": {"columns": ["text"], "data": [["fine"], [42]]}}, "row 1, column 'text': expected a string"),
    ({"inputs": {"text": [7]}}, "row 0, column 'text': expected a string"),
])
def test_sentiment_bad_rows(served, body, fragment):
    refused(*post(served["sentiment"].port, body), fragment)


def test_malformed_payloads(served):
    port = served["sentiment"].port
    refused(*post(port, b"{not json"), one_line=False)  # MLflow's parser refuses these before predict
    refused(*post(port, {"records": [{"text": "x"}]}), one_line=False)  # no known format key
    refused(*post(port, {"dataframe_records": [{"txt": "x"}]}), "unknown column(s) 'txt'")
    refused(*post(port, {"dataframe_records": [{"text": "x", "lenght": 3}]}), "unknown column(s) 'lenght'")
    refused(*post(port, "txt\nx\n", "text/csv"), "unknown column(s) 'txt'")


# --- translation ----------------------------------------------------------------------------------------


def test_translation_every_format_empty_and_unknown(served):
    server = served["translation"]
    texts = pd.DataFrame({"text": ["forty-two", "one hundred and seven", "banana", "seven bananas"]})
    expected = records(server.model.predict(texts))
    assert expected[2]["translation"] is None and expected[2]["unknown_share"] == 1.0
    assert expected[3]["unknown_share"] == 0.5 and isinstance(expected[3]["translation"], str)
    for name, (body, content_type) in formats(texts).items():
        same(predictions(*post(server.port, body, content_type)), expected, name)
    got = predictions(*post(server.port, {"dataframe_records": [{"text": ""}, {"text": "   "}]}))
    assert [g["translation"] for g in got] == ["", ""]


@pytest.mark.parametrize("body, fragment", [
    ({"dataframe_records": [{"text": 42}]}, "row 0, column 'text': expected a string, got int"),
    ({"inputs": {"text": 42}}, "row 0, column 'text': expected a string"),
    ({"instances": [{"text": "seven"}, {"text": None}]}, "row 1, column 'text': missing"),
])
def test_translation_bad_rows(served, body, fragment):
    refused(*post(served["translation"].port, body), fragment)


# --- charlm ---------------------------------------------------------------------------------------------


def test_charlm_partly_filled_batch_in_every_format(served):
    server = served["charlm"]
    net = server.model.unwrap_python_model().model
    frame = pd.DataFrame({"prime": ["The ", "ROMEO:", "A"], "length": [30, 25, None],
                          "temperature": [0.0, 1.0, 0.0], "top_k": [None, 5, None], "seed": [None, 7, None]})
    expected = [net.sample("The ", 30, 0.0), net.sample("ROMEO:", 25, 1.0, 5, seed=7), net.sample("A", 200, 0.0)]
    assert [r["text"] for r in records(server.model.predict(frame))] == expected
    for name, (body, content_type) in formats(frame).items():
        assert [p["text"] for p in predictions(*post(server.port, body, content_type))] == expected, name


def test_charlm_tiny_temperature_is_greedy(served):
    server = served["charlm"]
    net = server.model.unwrap_python_model().model
    for t in (1e-40, 5e-324):
        got = predictions(*post(server.port, {"dataframe_records": [
            {"prime": "ROMEO:", "length": 40, "temperature": t, "seed": 1}]}))
        assert got == [{"text": net.sample("ROMEO:", 40, 0.0)}]


@pytest.mark.parametrize("row, fragment", [
    ({"temperature": -0.5}, "column 'temperature'"),
    ({"temperature": "hot"}, "column 'temperature'"),
    ({"top_k": 0}, "column 'top_k'"),
    ({"top_k": -3}, "column 'top_k'"),
    ({"length": -1}, "column 'length'"),
    ({"length": 2.5}, "column 'length'"),
    ({"length": MAX_CHARS + 1}, f"between 0 and {MAX_CHARS}"),
    ({"seed": -1}, "column 'seed'"),
    ({"prime": ""}, "column 'prime': empty"),
    ({"prime": "\u00e9t\u00e9"}, "characters the model does not know"),
    ({"prime": None}, "column 'prime': missing"),
])
def test_charlm_bad_rows(served, row, fragment):
    body = {"dataframe_records": [{"prime": "ROMEO:", "length": 5}, {"prime": "ROMEO:", "length": 5} | row]}
    assert refused(*post(served["charlm"].port, body), fragment).startswith("row 1")


def test_charlm_generation_stays_within_the_cap(served):
    port = served["charlm"].port
    start = time.monotonic()
    got = predictions(*post(port, {"dataframe_records": [{"prime": "A", "length": MAX_CHARS, "seed": 0}]}))
    took = time.monotonic() - start
    assert len(got[0]["text"]) == 1 + MAX_CHARS and took < 30, took  # the scoring timeout is 60 s
    half = MAX_CHARS // 2 + 1
    refused(*post(port, {"dataframe_records": [{"prime": "A", "length": half}, {"prime": "B", "length": half}]}),
            f"at most {MAX_CHARS}")


# --- the servers ----------------------------------------------------------------------------------------


def test_one_signal_stops_the_server_and_no_type_hint_warning(served):
    for task, server in served.items():
        assert stop(server) < 30, f"{task}: one SIGTERM did not stop the server"
        log = server.log.read_text()
        assert "Add type hints" not in log, log[-2000:]
