"""Use registered models from the command line: `sample` (char LM text) and `predict` (any task).

    python -m pipeline sample --prime "ROMEO:" --length 300 --temperature 0.8
    python -m pipeline predict sentiment "a triumph of a film" "dull and lifeless"
    python -m pipeline predict translation "forty-two" --model-uri models:/translation/1
    python -m pipeline predict gesture series.npy

Models load by name and alias (default `models:/<task>@champion`) through mlflow.pyfunc.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params, PipelineError, first_line


def load(params: Params, uri: str):
    import mlflow

    from pipeline import tracking

    tracking.experiment_id(params)  # one clear line if the store is unusable
    try:
        with tracking.mlflow_uri(tracking.tracking_uri(params)):
            return mlflow.pyfunc.load_model(uri)
    except Exception as err:
        raise PipelineError(f"cannot load {uri}: {first_line(err)} (run `dvc repro register` first?)") from None


def sample(params: Params, uri: str, prime: str, length: int, temperature: float, top_k: int | None) -> str:
    import pandas as pd

    model = load(params, uri)
    columns = {"prime": [prime], "length": [length], "temperature": [temperature]}
    if top_k is not None:  # a None column cannot pass the signature's integer top_k
        columns["top_k"] = [top_k]
    frame = pd.DataFrame(columns)
    try:
        return model.predict(frame)["text"][0]
    except ValueError as err:
        raise PipelineError(str(err)) from None


def predict(params: Params, task: str, inputs: list[str], uri: str | None) -> str:
    import numpy as np
    import pandas as pd

    from pipeline.tasks import get_task

    topology = get_task(task).topology
    model = load(params, uri or f"models:/{task}@champion")
    if all(Path(i).suffix == ".npy" for i in inputs):
        out = model.predict(np.stack([np.load(i, allow_pickle=False) for i in inputs]).astype(np.float32))
    elif topology == "one_to_many":
        out = model.predict(pd.DataFrame({"seed": inputs}))
    elif topology == "char_lm":
        out = model.predict(pd.DataFrame({"prime": inputs}))
    else:
        out = model.predict(pd.DataFrame({"text": inputs}))
    return out.to_string(index=False) if isinstance(out, pd.DataFrame) else str(out)
