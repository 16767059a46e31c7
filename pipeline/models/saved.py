"""A trained model on disk: weights.safetensors + config.json, rebuilt from this package.

No pickled modules anywhere: the class is named in config.json and constructed from plain
hyper-parameters; the weights are tensors only.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from pipeline.config import PipelineError


def load_trained(model_dir: str | Path, device: str = "cpu"):
    """(model in eval mode, its config.json as a dict)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists() or not (model_dir / "weights.safetensors").exists():
        raise PipelineError(f"{model_dir}: no trained model (config.json + weights.safetensors); "
                            f"run `dvc repro train@{model_dir.name}`")
    info = json.loads((model_dir / "config.json").read_text())
    module, cls = info["model_class"].split(":")
    model = getattr(importlib.import_module(f"pipeline.models.{module}"), cls)(**info["hparams"])
    model.load_state_dict(load_file(model_dir / "weights.safetensors", device=device))
    return model.to(device).eval(), info
