"""The task registry: task key -> data builder, model class, key metric.

Stages ask this registry instead of branching on a task's name. Modules are named, not
imported, so `prepare digits` never imports music21 and `prepare` never imports Lightning.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pipeline.config import TASKS, ConfigError

# The model/train settings only some tasks read (params.yaml has them in every task's section); each Task
# lists those it reads in `uses`. Every other setting is read by every task.
OPTIONAL_SETTINGS = frozenset({"model.embedding_dim", "model.attention", "model.frame_stride", "model.bidirectional",
                               "train.block_size", "train.augment_shift"})


@dataclass(frozen=True)
class Task:
    name: str
    topology: str  # one_to_one, one_to_many, many_to_one, seq2seq, many_to_many, char_lm
    model: str  # "module:Class" under pipeline.models
    key_metric: str
    higher_is_better: bool
    uses: tuple[str, ...] = ()  # the OPTIONAL_SETTINGS this task's model and data module read
    evaluator: str | None = None  # evaluate.EVALUATORS key when not the topology's own (captions, video)

    @property
    def eval_split(self) -> str:
        """The held-out split evaluation reports on: the char LM's text has no test part, so val."""
        return "val" if self.topology == "char_lm" else "test"

    def own_params(self, section: dict) -> dict:
        """The task's params.yaml section ({"data", "model", "train"}) without the settings it never reads."""
        unused = OPTIONAL_SETTINGS - set(self.uses)
        return {group: ({k: v for k, v in values.items() if f"{group}.{k}" not in unused}
                        if isinstance(values, dict) else values) for group, values in section.items()}

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
        Task("digits", "one_to_one", "one_to_one:OneToOne", "accuracy", True, ("train.augment_shift",)),
        Task("melody", "one_to_many", "one_to_many:OneToMany", "nll", False, ("model.embedding_dim",)),
        Task("sentiment", "many_to_one", "many_to_one:ManyToOne", "accuracy", True,
             ("model.embedding_dim", "model.bidirectional")),
        Task("gesture", "many_to_one", "many_to_one:ManyToOne", "accuracy", True,
             ("model.frame_stride", "model.bidirectional")),
        Task("translation", "seq2seq", "seq2seq:Seq2Seq", "exact_match", True,
             ("model.embedding_dim", "model.attention", "model.bidirectional")),
        Task("activity", "many_to_many", "many_to_many:ManyToMany", "accuracy", True, ("model.bidirectional",)),
        Task("charlm", "char_lm", "char_lm:CharLM", "loss", False, ("model.embedding_dim", "train.block_size")),
        Task("captions", "one_to_many", "captioner:ImageCaptioner", "bleu", True, ("model.embedding_dim",),
             evaluator="captions"),
        Task("video", "many_to_many", "frames:FrameLabeller", "accuracy", True,
             ("model.embedding_dim", "model.bidirectional"), evaluator="video"),
    )
}
assert tuple(REGISTRY) == TASKS


def get_task(name: str) -> Task:
    if name not in REGISTRY:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(REGISTRY)}")
    return REGISTRY[name]
