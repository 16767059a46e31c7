"""Topology objects and tasks declared in params.yaml: stages ask a task's topology and never compare a name;
knobs a topology or source does not read are refused in one line; a task is a params section (its source a
built-in module, a module one writes, or another task's source under a new name)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from pipeline import sources, topologies
from pipeline.config import ConfigError, parse_params
from pipeline.sources import builtin_names
from pipeline.tasks import get_task
from pipeline.topologies import OPTIONAL_SETTINGS, TOPOLOGIES, get_topology

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


# --- no module outside the registry compares a topology's or a task's name -----------------------------


def _names() -> set[str]:
    return set(TOPOLOGIES) | set(builtin_names())


def _string_constants(node: ast.AST) -> list[str]:
    """String constants a comparison operand stands for: itself, or the members of a literal tuple/list/set."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _string_constants(e)]
    return []


def name_uses(path: Path) -> list[str]:
    """Where a module compares something with a topology or built-in task name, matches on one, or keys a
    dict literal by them (a per-name table): "file:line: what"."""
    names, found = _names(), []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        hits: list[str] = []
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                hits += [s for s in _string_constants(operand) if s in names]
        elif isinstance(node, ast.MatchValue):
            hits += [s for s in _string_constants(node.value) if s in names]
        elif isinstance(node, ast.Dict):
            keys = [s for k in node.keys if k is not None for s in _string_constants(k) if s in names]
            hits += keys if len(keys) >= 2 else []
        found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {s!r}" for s in hits]
    return found


def test_no_module_compares_a_topology_or_task_name():
    """The registry (pipeline/topologies.py) is the one place that lists topologies by name; a data module
    declares its own TOPOLOGY. Every other module asks a task's source or topology object."""
    modules = [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "topologies.py"]
    assert len(modules) > 30
    found = [hit for p in modules for hit in name_uses(p)]
    assert not found, found


def test_the_scan_finds_what_the_old_code_did(tmp_path):
    """The check above can fail: the branches this refactor removed are found."""
    old = tmp_path / "pipeline" / "old.py"
    old.parent.mkdir()
    old.write_text('split = "val" if task.topology == "char_lm" else "test"\n'
                   'EVALUATORS = {"one_to_one": 1, "many_to_one": 2}\n'
                   'if kind in ("charlm", "melody"):\n    pass\n'
                   'match topology:\n    case "seq2seq":\n        pass\n')
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "pipeline"
    try:
        found = name_uses(old)
    finally:
        PACKAGE = saved
    assert sorted(f.split(": ", 1)[1] for f in found) == sorted(["'char_lm'", "'one_to_one'", "'many_to_one'",
                                                                 "'charlm'", "'melody'", "'seq2seq'"])


# --- the registry --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_every_registered_topology_answers(name):
    from pipeline.models.base import RecurrentModule

    topology = get_topology(name)
    assert topology.name == name and isinstance(topology, topologies.Topology)
    assert issubclass(topology.model_class, RecurrentModule)
    module, cls = topology.model_path.split(":")
    assert getattr(sys.modules[f"pipeline.models.{module}"], cls) is topology.model_class  # what load_trained reads
    assert topology.eval_split in ("val", "test") and isinstance(topology.key_metric, str)
    for inputs in ("images", "tokens", "features"):
        assert topology.settings(inputs) <= OPTIONAL_SETTINGS
    for method in ("evaluate", "predict", "cli_input"):  # its own, not the base class's NotImplementedError
        assert getattr(type(topology), method) is not getattr(topologies.Topology, method), method


def test_unknown_topology_and_source_are_one_line():
    with pytest.raises(ConfigError, match=r"^params.yaml: digits.topology: unknown topology 'one_to_two'; known: "):
        parse_params({"digits": {"topology": "one_to_two"}})
    with pytest.raises(ConfigError, match=r"digits.topology: the built-in source 'digits' feeds one_to_one, not "
                                          r"seq2seq"):
        parse_params({"digits": {"topology": "seq2seq"}})
    with pytest.raises(ConfigError, match=r"mytext.data.source: missing"):
        parse_params({"tasks": ["mytext"], "mytext": {"topology": "char_lm"}})
    with pytest.raises(ConfigError, match=r"tasks.1: unknown task 'poetry'"):
        parse_params({"tasks": ["digits", "poetry"]})
    with pytest.raises(ConfigError, match=r"digits.dataa: unknown key"):
        parse_params({"digits": {"dataa": {}}})


# --- knobs a topology or a source does not read ---------------------------------------------------------


@pytest.mark.parametrize("raw, key", [
    ({"gesture": {"data": {"test_fraction": 0.1}}}, "gesture.data.test_fraction"),  # aeon's test split is the test
    ({"activity": {"data": {"test_fraction": 0.1}}}, "activity.data.test_fraction"),
    ({"charlm": {"data": {"test_fraction": 0.1}}}, "charlm.data.test_fraction"),  # val is the held-out text
])
def test_data_knobs_a_source_does_not_read_are_refused_when_params_load(raw, key):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert str(err.value).startswith(f"params.yaml: {key}: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("task, knob, value", [
    ("activity", "model.frame_stride", 4),
    ("digits", "model.bidirectional", True),
    ("melody", "model.bidirectional", True),
    ("charlm", "model.bidirectional", False),  # set at all, even to the default: it would do nothing
    ("sentiment", "model.frame_stride", 2),  # tokens, not features
    ("gesture", "model.embedding_dim", 16),  # features, not tokens
    ("translation", "train.augment_shift", 1),
    ("digits", "train.block_size", 64),
])
def test_model_knobs_a_topology_does_not_read_are_refused(task, knob, value):
    group, name = knob.split(".")
    params = parse_params({task: {group: {name: value}}})
    with pytest.raises(ConfigError) as err:
        get_task(task, params).check_settings()
    assert str(err.value).startswith(f"{task}.{knob}: not used by {params.task(task).topology}")


def test_the_default_params_set_no_unused_knob():
    from pipeline.config import load_params

    params = load_params(PACKAGE.parent / "params.yaml")
    for task in params.tasks:
        get_task(task, params).check_settings()


@pytest.mark.parametrize("task, uses", [
    ("digits", {"train.augment_shift"}), ("melody", {"model.embedding_dim"}),
    ("sentiment", {"model.embedding_dim", "model.bidirectional"}),
    ("gesture", {"model.frame_stride", "model.bidirectional"}),
    ("translation", {"model.embedding_dim", "model.attention", "model.bidirectional"}),
    ("activity", {"model.bidirectional"}), ("charlm", {"model.embedding_dim", "train.block_size"}),
])
def test_each_task_reads_the_knobs_it_read_before(task, uses):
    assert get_task(task).uses == uses


# --- tasks are params sections --------------------------------------------------------------------------


def test_a_task_can_reuse_a_builtin_source_under_another_name(tmp_path):
    """A second digits task with other settings: only a params section; it prepares from the same source."""
    from pipeline.prepare import prepare

    small = {"topology": "one_to_one", "data": {"source": "digits", "max_samples": 200}}
    params = parse_params({"tasks": ["digits", "small_digits"], "small_digits": small})
    task = get_task("small_digits", params)
    assert (task.topology_name, task.key_metric, task.source.builtin) == ("one_to_one", "accuracy", True)
    manifest = prepare("small_digits", params, tmp_path)
    assert sum(manifest["counts"].values()) == 200 and manifest["topology"] == "one_to_one"
    assert (tmp_path / "small_digits" / "train.npz").is_file()


def test_a_new_builtin_source_is_one_module(tmp_path, monkeypatch):
    """Adding a built-in task: a data module declaring TOPOLOGY, Data and build() plus a params section;
    nothing else names it (here the module lives in a temporary folder added to pipeline.datasets)."""
    import numpy as np

    import pipeline.datasets
    from pipeline.datasets.prepared import load_split
    from pipeline.prepare import prepare

    folder = tmp_path / "datasets"
    folder.mkdir()
    (folder / "parity.py").write_text('''
import numpy as np
from pydantic import Field
from pipeline.config import SplitData
from pipeline.datasets.common import split_indices
from pipeline.datasets.prepared import Prepared

TOPOLOGY = "one_to_one"

class Data(SplitData):
    source: str = "parity"
    samples: int = Field(64, gt=10)
    val_fraction: float = 0.25
    test_fraction: float = 0.25

def build(cfg, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, (cfg.samples, 4)).astype(np.float32)
    y = (x.sum(1) % 2).astype(np.int64)
    parts = split_indices(len(y), cfg.val_fraction, cfg.test_fraction, rng)
    return Prepared({s: {"x": x[i], "y": y[i]} for s, i in parts.items()}, {"labels": ["even", "odd"]},
                    {"package": "tests"})
''')
    monkeypatch.setattr(pipeline.datasets, "__path__", [*pipeline.datasets.__path__, str(folder)])
    monkeypatch.setattr(sources, "DATASETS_DIR", folder)
    sources._builtin_module.cache_clear()
    try:
        params = parse_params({"tasks": ["parity"], "parity": {"data": {"samples": 40}}})
        assert params.task("parity").topology == "one_to_one" and sources.builtin_names() == ["parity"]
        prepare("parity", params, tmp_path / "prepared")
        train = load_split(tmp_path / "prepared" / "parity", "train")
        assert np.array_equal(train["y"], train["x"].sum(1) % 2)
        assert get_task("parity", params).key_metric == "accuracy"
        with pytest.raises(ConfigError, match="parity.data.sampels: Extra inputs are not permitted"):
            parse_params({"tasks": ["parity"], "parity": {"data": {"sampels": 40}}})
    finally:
        sources._builtin_module.cache_clear()
