"""params.yaml validation: every problem is one line naming the key and the file."""

import pytest
import yaml

from pipeline.config import ConfigError, load_params, parse_params
from pipeline.sources import builtin_names
from pipeline.tasks import get_task


def test_default_params_file_is_valid_and_complete():
    params = load_params("params.yaml")
    raw = yaml.safe_load(open("params.yaml"))
    assert sorted(params.tasks) == builtin_names()  # every built-in task runs by default
    for task in params.tasks:  # each section names its topology and its source
        assert params.task(task).model.hidden_size > 0
        assert raw[task]["topology"] == params.task(task).topology == get_task(task).topology_name
        assert raw[task]["data"]["source"] == params.task(task).data.source == task


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"digits": {"data": {"max_samples": -5}}}, "digits.data.max_samples"),
        ({"digits": {"model": {"hiden_size": 3}}}, "digits.model.hiden_size"),
        ({"bogus": 1}, "bogus"),
        ({"tasks": []}, "task list is empty"),
        ({"tasks": ["digits", "poetry"]}, "tasks.1"),
        ({"trainer": {"strategy": "ddpx"}}, "unknown strategy"),
        ({"trainer": {"devices": 0}}, "trainer.devices"),
        ({"charlm": {"train": {"lr": "fast"}}}, "charlm.train.lr"),
        ({"melody": {"data": {"val_fraction": 0.5, "test_fraction": 0.45}}}, "melody.data"),
        ({"gesture": 7}, "gesture"),
        ([1, 2], "top level"),
    ],
)
def test_bad_params_give_one_line_naming_the_problem(raw, fragment):
    with pytest.raises(ConfigError) as err:
        parse_params(raw, "params.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("params.yaml")
    assert fragment in message


def test_broken_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1, 2\ntasks: x")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_unknown_task():
    with pytest.raises(ConfigError, match="unknown task 'poetry'"):
        get_task("poetry")
    with pytest.raises(ConfigError, match="unknown task"):
        parse_params({}).task("poetry")
