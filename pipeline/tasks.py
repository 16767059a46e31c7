"""A task: a section of params.yaml naming its topology and its data source, resolved for the stages.

    digits:                      # a task (listed in `tasks:` to run)
      topology: one_to_one       # pipeline/topologies.py: the model, its evaluation, serving, CLI verbs
      data: {source: digits, max_samples: 5000}   # a built-in source (pipeline/datasets/digits.py) or a path
      model: {...}
      train: {...}

Stages ask the Task (its `source` and its `topology` object) instead of branching on a name. The source
is resolved without torch (prepare never imports Lightning); the topology object imports its module.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from pipeline.config import ConfigError, Params, TaskParams
from pipeline.sources import Source, resolve
from pipeline.topologies import Topology, get_topology, load_variant


@dataclass(frozen=True)
class Task:
    name: str
    section: TaskParams

    @property
    def topology_name(self) -> str:
        return self.section.topology

    @cached_property
    def source(self) -> Source:
        return resolve(self.section.data.source)

    @property
    def data_module(self):
        """The source's module: a built-in's pipeline.datasets.<source>, or the files reader."""
        return self.source.module

    @property
    def inputs(self) -> str:
        """What the model reads: "images", "tokens" or "features" (the data schema says)."""
        return type(self.section.data).inputs

    @cached_property
    def topology(self) -> Topology:
        """The topology object; a built-in source may declare its own variant of it (Source.variant)."""
        variant = self.source.variant
        return load_variant(variant, self.topology_name) if variant else get_topology(self.topology_name)

    # what the topology decides
    @property
    def key_metric(self) -> str:
        return self.topology.key_metric

    @property
    def higher_is_better(self) -> bool:
        return self.topology.higher_is_better

    @property
    def eval_split(self) -> str:
        return self.topology.eval_split

    @property
    def model_class(self):
        return self.topology.model_class

    @property
    def model(self) -> str:
        """"module:Class" under pipeline.models (config.json's model_class)."""
        return self.topology.model_path

    @property
    def uses(self) -> frozenset[str]:
        """The optional model/train settings (topologies.OPTIONAL_SETTINGS) this task reads."""
        return self.topology.settings(self.inputs)

    def check_settings(self) -> None:
        """ConfigError naming the first model/train knob set in params.yaml that this task's topology ignores."""
        unused = self.topology.unused_settings(self.section, self.inputs)
        if unused:
            raise ConfigError(f"{self.name}.{unused[0]}: not used by {self.topology_name} over "
                              f"{self.inputs}; remove it from params.yaml")

    def own_params(self, section: dict) -> dict:
        """The task's section as a dict without the settings it never reads."""
        return self.topology.own_params(section, self.inputs)


def get_task(name: str, params: Params | None = None) -> Task:
    """The task `name` of `params` (default: a built-in task with its defaults); ConfigError if unknown."""
    section = (params if params is not None else _builtin_params(name)).task(name)
    return Task(name, section)


def _builtin_params(name: str) -> Params:
    from pipeline.sources import builtin_names, is_builtin

    if not is_builtin(name):
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(builtin_names())}")
    return Params(tasks=[name])
