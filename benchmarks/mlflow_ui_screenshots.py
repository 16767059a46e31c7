"""Screenshots of the MLflow UI over the project's store, as a user sees it, in headless Chromium.

    python benchmarks/mlflow_ui_screenshots.py [--out DIR] [--task gesture] [--uri sqlite:///...]

Starts `mlflow server` on 127.0.0.1 (a free port, its own process group, stopped at the end) over
the repo's tracking store (params.yaml's, or --uri), and saves PNGs of:

    experiment.png   the experiment's runs: run names, dataset column, durations (in the "Model
                     training" view: MLflow 3.17 opens the GenAI overview unless asked)
    genai.png        the same URL without asking: what a first visit shows
    run.png          the newest run of --task: params, metrics, tags, its input dataset
    model.png        the registered model of --task: its description and versions
    version.png      its newest version: the description saying why the champion moved or stayed

Chromium is Debian's (`apt-get install chromium`); the UI is a JavaScript app, so each page gets
--virtual-time-budget (virtual milliseconds in which the page's scripts and requests run) before
the shot: a plain --screenshot shows spinners. Exit status 1 when a page cannot be shot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def start_server(uri: str, port: int, log: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow if mlflow.exists() else "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", uri]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            sys.exit(f"mlflow server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop(server)
            sys.exit("mlflow server not ready in 120 s")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)
    except ProcessLookupError:
        pass


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    sys.exit("no Chromium found: apt-get install chromium")


def shoot(browser: str, url: str, path: Path, budget_ms: int, size: str, timeout: float = 120) -> None:
    """One page into `path`, after `budget_ms` of virtual time; a fresh profile, so no view is remembered.
    Chromium runs in its own process group, killed whole when it overruns `timeout` seconds (under load a
    page's virtual time has stalled for minutes: one retry)."""
    for _attempt in (1, 2):
        with tempfile.TemporaryDirectory() as profile:
            cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                   f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={budget_ms}",
                   f"--screenshot={path}", url]
            process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)
            try:
                _, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                err = f"no screenshot after {timeout:.0f} s"
            finally:
                try:  # helpers (crashpad, zygote) left in the group
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if process.returncode == 0 and path.exists():
            return
    raise RuntimeError(f"chromium could not shoot {url}: {err[-500:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "mlflow_ui_screenshots")
    parser.add_argument("--task", default="gesture", help="whose run and registered model to show")
    parser.add_argument("--uri", help="tracking store (default: params.yaml's, anchored at the repo root)")
    parser.add_argument("--experiment", help="experiment name (default: params.yaml's)")
    parser.add_argument("--budget", type=int, default=15000, help="virtual milliseconds per page")
    parser.add_argument("--size", default="1920,1080", help="window width,height in pixels")
    args = parser.parse_args()

    from pipeline import tracking
    from pipeline.config import load_params

    params = load_params(REPO / "params.yaml")
    uri = args.uri or tracking.tracking_uri(params, REPO)
    name = args.experiment or params.tracking.experiment
    args.out.mkdir(parents=True, exist_ok=True)
    browser, port = chromium(), free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(uri, port, args.out / "server.log")
    try:
        query = urllib.parse.urlencode({"experiment_name": name})
        experiment = api(base, f"experiments/get-by-name?{query}")["experiment"]
        eid = experiment["experiment_id"]
        runs = api(base, "runs/search", {"experiment_ids": [eid], "filter": f"tags.task = '{args.task}'",
                                         "order_by": ["attributes.start_time DESC"], "max_results": 1})
        if not runs.get("runs"):
            sys.exit(f"no run of {args.task} in experiment {name} at {uri}")
        run_id = runs["runs"][0]["info"]["run_id"]
        query = urllib.parse.urlencode({"filter": f"name='{args.task}'"})
        versions = api(base, f"model-versions/search?{query}").get("model_versions", [])
        newest = max((int(v["version"]) for v in versions), default=None)
        # MLflow 3.17's UI opens experiments in its GenAI view unless the "Model training" switch was clicked
        # in this browser (remembered locally) or the URL asks for it: ask, as a returning user would have
        training = "?workflowType=machine_learning"
        pages = {"experiment": f"{base}/#/experiments/{eid}{training}",
                 "run": f"{base}/#/experiments/{eid}/runs/{run_id}{training}",
                 "model": f"{base}/#/models/{args.task}"}
        pages["genai"] = f"{base}/#/experiments/{eid}"
        if newest is not None:
            pages["version"] = f"{base}/#/models/{args.task}/versions/{newest}"
        failed = []
        for name, url in pages.items():
            path = args.out / f"{name}.png"
            path.unlink(missing_ok=True)
            try:
                shoot(browser, url, path, args.budget, args.size)
                print(f"{path}  {url}")
            except RuntimeError as err:
                failed.append(name)
                print(f"{name}: {err}", file=sys.stderr)
        print("experiment tags:", {t["key"]: t["value"] for t in experiment.get("tags", [])})
    finally:
        stop(server)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
