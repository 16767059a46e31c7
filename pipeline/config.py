"""params.yaml -> typed, validated settings: the one place for defaults.

Every section forbids unknown keys, so a typo in params.yaml is an error naming the key,
not a silently ignored knob. `load_params` turns any problem into one `ConfigError` line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

PARAMS_FILE = "params.yaml"

# Lightning's registered strategy names (StrategyRegistry), checked without importing Lightning
# so that even `prepare` rejects a typo before doing any work.
STRATEGY = r"^(auto|ddp(_spawn|_fork|_notebook)?(_find_unused_parameters_(true|false))?|fsdp(_cpu_offload)?"
STRATEGY += r"|deepspeed(_stage_[123](_offload(_nvme)?)?)?|single_device|single_tpu|single_xla|xla(_debug)?)$"

Fraction = Field(ge=0.0, lt=1.0)


class PipelineError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""


class ConfigError(PipelineError):
    pass


def first_line(err: BaseException, limit: int = 200) -> str:
    """What a library's exception says, cut to one line for a PipelineError."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- a task's sections: data (its source's schema), model, train ----------------------------------


class DataSection(Section):
    """A task's `data` section: `source` names a built-in source (pipeline/datasets/<name>.py) or a path
    (a user's file or folder: relative paths are under data/own/). Each source subclasses this with its
    own knobs; unknown keys are errors, so a knob the source does not read is refused by name."""

    source: str
    # which model knobs apply (pipeline.topologies.Topology.settings): "tokens" (embedding_dim) or "features"
    inputs: ClassVar[str] = "features"


class SplitData(DataSection):
    """A source that draws its own val and test splits."""

    val_fraction: float = Fraction
    test_fraction: float = Fraction

    @model_validator(mode="after")
    def _fractions_leave_training_data(self):
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        return self

# --- model and training: shared shape for every task ------------------------------------------


class ModelConfig(Section):
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(1, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # between stacked layers and before the head
    embedding_dim: int = Field(64, gt=0)  # token inputs only
    attention: bool = True  # seq2seq only: Luong dot attention over encoder states
    frame_stride: int = Field(1, gt=0)  # feature sequences: k consecutive steps -> one step of k x features
    # many_to_one, many_to_many and the seq2seq encoder: read each sequence both ways (Schuster & Paliwal
    # 1997). Many-to-many labels then see the future: right for offline labelling, not for streaming
    bidirectional: bool = False


class TrainConfig(Section):
    batch_size: int = Field(64, gt=0)  # global: split across devices
    max_epochs: int = Field(5, gt=0)
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    gradient_clip_val: float | None = Field(1.0, gt=0.0)
    block_size: int = Field(128, gt=1)  # charlm: characters per training window
    limit_train_batches: float | int = Field(1.0, gt=0)  # Lightning's: a fraction or a count
    augment_shift: int = Field(0, ge=0)  # images: random translation by up to this many pixels in training


class TaskParams(Section):
    """One task's section of params.yaml: its topology, its data (the source's schema), model and train.

    Build it with `task_section(name, raw)`, which picks the data schema from the source."""

    topology: str
    data: SerializeAsAny[DataSection]
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


class SectionError(ValueError):
    """A problem in one task's section, its message starting with the dotted key ("digits.data.max_samples: ...")."""


def _validated(schema: type[BaseModel], raw: object, where: str):
    try:
        return schema.model_validate({} if raw is None else raw)
    except ValidationError as err:
        raise SectionError(f"{where}.{_first_error(err)}" if err.errors()[0]["loc"] else
                           f"{where}: {_first_error(err)}") from None


def task_section(name: str, raw: object) -> TaskParams:
    """A task's params section, validated: `raw` is params.yaml's mapping (or None: a built-in task's defaults).

    `data.source` picks the data schema (pipeline.sources); a built-in task's section may leave out `topology`
    and `data.source` (the built-in source of the task's name and its topology). SectionError (a ValueError,
    one line naming the key) for anything wrong, such as a knob the source does not read."""
    from pipeline import sources, topologies

    if isinstance(raw, TaskParams):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SectionError(f"{name}: a task section must be a mapping (topology, data, model, train), "
                           f"got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"topology", "data", "model", "train"})
    if unknown:
        raise SectionError(f"{name}.{unknown[0]}: unknown key (a task section holds topology, data, model, train)")
    data = raw.get("data") or {}
    if isinstance(data, DataSection):
        data = data.model_dump()
    if not isinstance(data, dict):
        raise SectionError(f"{name}.data: must be a mapping")
    source_name = data.get("source", name if sources.is_builtin(name) else None)
    if source_name is None:
        raise SectionError(f"{name}.data.source: missing; name a built-in source ({', '.join(sources.builtin_names())})"
                           f" or your file or folder under {sources.OWN_DATA}/")
    if not isinstance(source_name, str) or not source_name.strip():
        raise SectionError(f"{name}.data.source: must be a non-empty string")
    try:
        source = sources.resolve(source_name)
    except ConfigError as err:
        raise SectionError(f"{name}.data.source: {err}") from None
    topology = raw.get("topology", source.topology)
    if topology is None:
        raise SectionError(f"{name}.topology: missing; the topology the data feed: {', '.join(topologies.TOPOLOGIES)}")
    try:
        topologies.check_name(topology)
        schema = source.schema(topology, {**data, "source": source_name})  # a built-in feeds one topology
    except ConfigError as err:
        raise SectionError(f"{name}.topology: {err}") from None
    return TaskParams(topology=topology, data=_validated(schema, {**data, "source": source_name}, f"{name}.data"),
                      model=_validated(ModelConfig, raw.get("model"), f"{name}.model"),
                      train=_validated(TrainConfig, raw.get("train"), f"{name}.train"))



class TrainerConfig(Section):
    """Passed to `lightning.Trainer` as it is."""

    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    strategy: str = "auto"
    num_nodes: int = Field(1, gt=0)
    precision: str = "32-true"

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if not re.match(STRATEGY, value):
            raise ValueError(f"unknown strategy {value!r} (Lightning's: auto, ddp, ddp_spawn, fsdp, deepspeed, ...)")
        return value

    @field_validator("devices")
    @classmethod
    def _positive_devices(cls, value):
        if isinstance(value, int) and value == 0:
            raise ValueError("devices must be positive, -1 or 'auto'")
        if isinstance(value, int) and value < -1:
            raise ValueError("devices must be positive, -1 or 'auto'")
        return value


class TrackingConfig(Section):
    uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI wins when set
    artifact_location: str = "mlruns"  # relative to the repo root
    experiment: str = "rnn-pipeline"


class LongRangeConfig(Section):
    gaps: list[int] = Field(default_factory=lambda: [5, 10, 20, 50, 100])
    vocab_size: int = Field(8, gt=1)  # the tokens to remember; distractors are drawn apart
    train_samples: int = Field(2000, gt=0)
    test_samples: int = Field(500, gt=0)
    hidden_size: int = Field(32, gt=0)
    batch_size: int = Field(64, gt=0)
    max_epochs: int = Field(10, gt=0)
    lr: float = Field(1e-2, gt=0.0)

    @field_validator("gaps")
    @classmethod
    def _positive_gaps(cls, value: list[int]) -> list[int]:
        if not value or any(g <= 0 for g in value):
            raise ValueError("gaps must be a non-empty list of positive integers")
        return value


FIXED_SECTIONS = ("seed", "tasks", "trainer", "tracking", "longrange")  # every other top-level key is a task


def _default_tasks() -> list[str]:
    from pipeline.sources import builtin_names

    return builtin_names()


class Params(Section):
    """params.yaml. Every top-level key besides FIXED_SECTIONS is a task's section (TaskParams); `tasks` lists
    the ones the pipeline runs. A built-in task (a built-in source's name) needs no section: its defaults."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, TaskParams]

    seed: int = 1337
    tasks: list[str] = Field(default_factory=_default_tasks)
    trainer: TrainerConfig = TrainerConfig()
    tracking: TrackingConfig = TrackingConfig()
    longrange: LongRangeConfig = LongRangeConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_sections(cls, raw):
        if not isinstance(raw, dict):
            return raw
        return {key: value if key in FIXED_SECTIONS else task_section(key, value) for key, value in raw.items()}

    @field_validator("tasks")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("the task list is empty")
        if len(set(value)) != len(value):
            raise ValueError("a task is listed twice")
        return value

    @model_validator(mode="after")
    def _every_task_has_a_section(self):
        from pipeline.sources import is_builtin

        for i, name in enumerate(self.tasks):
            if name in FIXED_SECTIONS:
                raise SectionError(f"tasks.{i}: {name!r} is a params section, not a task")
            if name not in self.sections and not is_builtin(name):
                raise SectionError(f"tasks.{i}: unknown task {name!r}: no `{name}:` section in params.yaml and no "
                                   "built-in source of that name")
        return self

    @property
    def sections(self) -> dict[str, TaskParams]:
        """The task sections written in params.yaml, by task name."""
        return dict(self.__pydantic_extra__ or {})

    def task(self, name: str) -> TaskParams:
        """The task's section: as written in params.yaml, else a built-in task's defaults; ConfigError otherwise."""
        from pipeline.sources import builtin_names, is_builtin

        if name in self.sections:
            return self.sections[name]
        if name in FIXED_SECTIONS or not is_builtin(name):
            known = sorted({*self.sections, *builtin_names()})
            raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(known)}")
        return task_section(name, None)


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {msg}{more}" if where else f"{msg}{more}"


def parse_params(raw: object, source: str = PARAMS_FILE) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_first_error(err)}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if raw is None:  # empty or comments only: a truncated file, not a request for every default
        raise ConfigError(f"{path}: the params file is empty")
    return parse_params(raw, str(path))
