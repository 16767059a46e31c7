"""The task registry: task key -> data builder, model class, key metric.

Stages ask this registry instead of branching on a task's name. Modules are named, not
imported, so `prepare digits` never imports music21 and `prepare` never imports Lightning.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pipeline.config import TASKS, ConfigError


@dataclass(frozen=True)
class Task:
    name: str
    topology: str  # one_to_one, one_to_many, many_to_one, seq2seq, many_to_many, char_lm
    model: str  # "module:Class" under pipeline.models
    key_metric: str
    higher_is_better: bool

    @property
    def data_module(self):
        """pipeline.datasets.<task>: build(cfg, seed) -> Prepared."""
        return importlib.import_module(f"pipeline.datasets.{self.name}")

    @property
    def model_class(self):
        module, cls = self.model.split(":")
        return getattr(importlib.import_module(f"pipeline.models.{module}"), cls)


REGISTRY: dict[str, Task] = {
    t.name: t
    for t in (
        Task("digits", "one_to_one", "one_to_one:OneToOne", "accuracy", True),
        Task("melody", "one_to_many", "one_to_many:OneToMany", "nll", False),
        Task("sentiment", "many_to_one", "many_to_one:ManyToOne", "accuracy", True),
        Task("gesture", "many_to_one", "many_to_one:ManyToOne", "accuracy", True),
        Task("translation", "seq2seq", "seq2seq:Seq2Seq", "exact_match", True),
        Task("activity", "many_to_many", "many_to_many:ManyToMany", "accuracy", True),
        Task("charlm", "char_lm", "char_lm:CharLM", "loss", False),
    )
}
assert tuple(REGISTRY) == TASKS


def get_task(name: str) -> Task:
    if name not in REGISTRY:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(REGISTRY)}")
    return REGISTRY[name]
