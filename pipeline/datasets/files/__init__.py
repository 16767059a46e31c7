"""Users' own files as task data: readers that produce the `Prepared` a built-in task of the same topology
produces, so the topology's model, training, evaluation and serving take them unchanged.

A task declares its topology and `data.source`, a path relative to the repository root (where DVC runs);
the format follows from the topology (for many_to_one from the source: a folder or a `.ts` file is series,
anything else a CSV of texts), or is named by `data.format`. Every format reads UTF-8 (a leading byte-order
mark is dropped, Windows line ends become "\\n"). Splits are drawn with `seed` (the same seed gives the same
arrays byte for byte); classifiers' splits are stratified by label. Labels are strings, sorted with numbers
by value ("2" before "10"); vocab["labels"] keeps them.

    format         topology      source
    text           char_lm       a UTF-8 text file, or a folder: every `*.txt` under it (subfolders too) joined
                                 in sorted path order, a "\\n" added after a file that lacks one. Contiguous
                                 split: the last val_fraction of the characters is val (test repeats val, as for
                                 charlm). Knobs: val_fraction (0.1), max_chars (none: all).
    labelled_text  many_to_one   a CSV with a header: a text column and a label column; other columns ignored.
                                 Tokenized like the sentiment task (lowercased words, each punctuation mark a
                                 token); the vocabulary comes from train (<pad> 0, <unk> 1). Knobs: text_column
                                 ("text"), label_column ("label"), delimiter (tab for .tsv, else ","),
                                 max_tokens (64), min_count (2), max_vocab (20000), val/test_fraction (0.1).
    series         many_to_one   a folder with one subfolder per label holding `.npy` series, each (T,) or
                                 (T, channels), any length; or an aeon/sktime `.ts` file with class labels
                                 (read by aeon.datasets.load_from_ts_file; unequal lengths and several channels
                                 are fine). Trailing NaN steps are padding; a NaN inside a series is an error.
                                 Standardised per channel with train statistics, zero-padded, as gesture.
                                 Knobs: val/test_fraction (0.1).
    pairs          seq2seq       a TSV (tab-separated), one pair a line: source text, target text (further
                                 columns ignored), no header unless `header: true`. Knobs: tokens ("words":
                                 lowercased words and punctuation marks as translation; "chars": every character,
                                 spaces too), source_column (0), target_column (1) (names if header: true),
                                 header (false), min_count (1), val/test_fraction (0.1). Vocabularies from train:
                                 <pad> 0, <unk> 1, <bos> 2, <eos> 3; vocab["tokenizer"] records `tokens`.
    steps          many_to_many  a CSV with a header, one row per step: a sequence id column, a label column and
                                 numeric feature columns. A sequence's steps are its rows in file order (or sorted
                                 by `order_column`); its rows need not be adjacent. Sequences are split at random;
                                 features standardised per column with the training steps' statistics. Knobs:
                                 sequence_column ("sequence"), label_column ("label"), order_column (none),
                                 feature_columns (none: every other column), delimiter (","), val/test_fraction.
    table          one_to_one    a CSV with a header: numeric feature columns and a label column. Features
                                 standardised with the training rows' mean and std (kept in vocab["mean"],
                                 vocab["std"], with vocab["features"], the column names). Knobs: label_column
                                 ("label"), feature_columns (none: every other column), delimiter (","),
                                 val/test_fraction (0.1).

Errors are `PipelineError`s of one line naming the file (and the column and line): a missing file or
column, an empty file, bytes that are not UTF-8, a label column with one class, a feature that is not a
finite number, rows too few for the splits. `prepare` writes nothing on an error (pipeline.atomic).

The manifest's `source` holds the path as given, the format, its sha256 and size in bytes (a folder: the
hash of its files' relative paths and hashes), the columns used; the stats hold row, character or sequence
counts and class counts; `prepare` adds the vocabulary sizes.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, ValidationError, model_validator

from pipeline.config import ConfigError, DataSection, PipelineError, SplitData
from pipeline.datasets.prepared import Prepared

Fraction = Field(0.1, ge=0.0, lt=1.0)


class FileData(DataSection):
    """A user's file or folder: `source` (resolved by pipeline.sources: relative paths under data/own/)."""

    source: str = Field(min_length=1)
    val_fraction: float = Fraction
    topology: ClassVar[str]  # the topology whose data this format makes

    @classmethod
    def claims(cls, source: Path) -> bool:
        """Whether this format is the default for `source` among its topology's formats (else the first)."""
        return False

    @model_validator(mode="before")
    @classmethod
    def _known_knobs(cls, data):
        """A knob this format does not read, named with the knobs it does (rather than pydantic's "Extra inputs
        are not permitted")."""
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                fmt = cls.model_fields["format"].default
                raise ValueError(f"the {fmt} format has no knob {unknown[0]!r}; its knobs: "
                                 f"{', '.join(cls.model_fields)}")
        return data

    def read(self, seed: int, path: Path) -> Prepared:
        """The Prepared of the file or folder at `path` (data.source resolved)."""
        raise NotImplementedError

    def example(self, path: Path):
        """Two inputs from the user's data as the served model's predict takes them (MLflow's input example)."""
        module, function = EXAMPLES[self.model_fields["format"].default].split(":")
        return getattr(import_module(f"pipeline.datasets.files.{module}"), function)(self, path)


class SplitFileData(FileData, SplitData):
    """A file source that draws val and test splits (val_fraction + test_fraction < 0.9: SplitData's check)."""

    val_fraction: float = Fraction
    test_fraction: float = Fraction


class TextData(FileData):  # no test_fraction: the char LM is evaluated on val (test repeats it)
    format: Literal["text"] = "text"
    topology: ClassVar[str] = "char_lm"
    inputs: ClassVar[str] = "tokens"
    max_chars: int | None = Field(None, gt=3)

    def read(self, seed: int, path: Path) -> Prepared:
        from pipeline.datasets.files.text import build_corpus

        return build_corpus(self, seed, path)


class LabelledTextData(SplitFileData):
    format: Literal["labelled_text"] = "labelled_text"
    topology: ClassVar[str] = "many_to_one"
    inputs: ClassVar[str] = "tokens"
    text_column: str = "text"
    label_column: str = "label"
    delimiter: str | None = Field(None, min_length=1, max_length=1)  # None: tab for a .tsv file, else ","
    max_tokens: int = Field(64, gt=0)
    min_count: int = Field(2, ge=1)  # rarer words map to <unk>
    max_vocab: int = Field(20000, gt=2)

    @property
    def separator(self) -> str:
        return self.delimiter or ("\t" if self.source.lower().endswith(".tsv") else ",")

    def read(self, seed: int, path: Path) -> Prepared:
        from pipeline.datasets.files.text import build_labelled_text

        return build_labelled_text(self, seed, path)


class SeriesData(SplitFileData):
    format: Literal["series"] = "series"
    topology: ClassVar[str] = "many_to_one"

    @classmethod
    def claims(cls, source: Path) -> bool:
        """A .ts file, a folder, or a name without suffix (a folder not made yet): series, not a CSV of texts."""
        from pipeline.sources import OWN_DATA

        return (source.suffix.lower() == ".ts" or not source.suffix or source.is_dir()
                or (not source.is_absolute() and (OWN_DATA / source).is_dir()))

    def read(self, seed: int, path: Path) -> Prepared:
        from pipeline.datasets.files.numeric import build_series

        return build_series(self, seed, path)


class PairsData(SplitFileData):
    format: Literal["pairs"] = "pairs"
    topology: ClassVar[str] = "seq2seq"
    inputs: ClassVar[str] = "tokens"
    tokens: Literal["words", "chars"] = "words"
    header: bool = False
    source_column: int | str = 0  # a 0-based position, or a header name with header: true
    target_column: int | str = 1
    min_count: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _names_need_a_header(self):
        for knob in ("source_column", "target_column"):
            if isinstance(getattr(self, knob), str) and not self.header:
                raise ValueError(f"{knob} is a name: set header: true, or give the column's 0-based position")
        return self

    def read(self, seed: int, path: Path) -> Prepared:
        from pipeline.datasets.files.text import build_pairs

        return build_pairs(self, seed, path)


class StepsData(SplitFileData):
    format: Literal["steps"] = "steps"
    topology: ClassVar[str] = "many_to_many"
    sequence_column: str = "sequence"
    label_column: str = "label"
    order_column: str | None = None  # None: the file's order
    feature_columns: list[str] | None = Field(None, min_length=1)  # None: every other column
    delimiter: str = Field(",", min_length=1, max_length=1)

    def read(self, seed: int, path: Path) -> Prepared:
        from pipeline.datasets.files.numeric import build_steps

        return build_steps(self, seed, path)


class TableData(SplitFileData):
    format: Literal["table"] = "table"
    topology: ClassVar[str] = "one_to_one"
    label_column: str = "label"
    feature_columns: list[str] | None = Field(None, min_length=1)  # None: every other column
    delimiter: str = Field(",", min_length=1, max_length=1)

    def read(self, seed: int, path: Path) -> Prepared:
        from pipeline.datasets.files.numeric import build_table

        return build_table(self, seed, path)


FORMATS: dict[str, type[FileData]] = {cls.model_fields["format"].default: cls for cls in (
    TextData, LabelledTextData, SeriesData, PairsData, StepsData, TableData)}
EXAMPLES = {"text": "text:example_corpus", "labelled_text": "text:example_labelled_text",
            "pairs": "text:example_pairs", "series": "numeric:example_series", "steps": "numeric:example_steps",
            "table": "numeric:example_table"}


def formats(topology: str) -> list[str]:
    """The formats that make `topology`'s data, in FORMATS order."""
    return [name for name, cls in FORMATS.items() if cls.topology == topology]


def default_format(topology: str, source: str) -> str:
    """The format a source is read in when `data.format` is not set: the first of the topology's formats that
    claims the source (many_to_one: a folder or a .ts file is series), else its first (a CSV of texts)."""
    names = formats(topology)
    if not names:
        takers = ", ".join(dict.fromkeys(cls.topology for cls in FORMATS.values()))
        raise ConfigError(f"{topology} takes no file source; those that do: {takers}")
    return next((name for name in names if FORMATS[name].claims(Path(source))), names[0])


def schema(topology: str, data: object = None, where: str = "data") -> type[FileData]:
    """The pydantic model of a file source's `data` section: by `data["format"]` when set, else by the
    topology (and for many_to_one by the source, see default_format). ConfigError for a topology that takes
    no file, an unknown format or one the topology cannot read."""
    raw = data if isinstance(data, dict) else {}
    fmt = raw.get("format") or default_format(topology, str(raw.get("source") or ""))
    if fmt not in FORMATS:
        raise ConfigError(f"unknown {where}.format {fmt!r}; the formats: {', '.join(FORMATS)}")
    if fmt not in formats(topology):
        raise ConfigError(f"{topology} does not read {where}.format {fmt!r}; it reads "
                          f"{', '.join(formats(topology)) or 'no user files'}")
    return FORMATS[fmt]


def data_params(topology: str, raw: object, where: str = "data") -> FileData:
    """A task's `data` section ({source, [format], knobs}) validated against its format's schema.

    Raises ConfigError in one line: an unknown format, a format the topology cannot read, an unknown knob
    (each format refuses the knobs it does not read), a bad value."""
    if not isinstance(raw, dict) or not raw.get("source"):
        raise ConfigError(f"{where}.source: required, the path of the task's file or folder")
    cls = schema(topology, raw, where)
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        knob = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}.{knob}: {msg}" if knob else f"{where}: {msg}") from None


def _shown(path: Path) -> Path:
    """`path` relative to the working directory when it lies inside it: error messages name
    data/own/reviews.csv, not the absolute path the caller resolved."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except (ValueError, OSError):
        return path


def build(cfg: FileData, seed: int, path: str | Path | None = None) -> Prepared:
    """The `Prepared` of a user source; `path` is data.source resolved (default: data.source as it is).
    The manifest's source path is data.source as written in params.yaml."""
    if not isinstance(cfg, FileData):
        raise PipelineError(f"not a user-file data section: {type(cfg).__name__}")
    prepared = cfg.read(seed, _shown(Path(cfg.source) if path is None else Path(path)))
    prepared.source = {**prepared.source, "path": cfg.source}
    return prepared


def example(cfg: FileData, path: str | Path | None = None):
    """MLflow's input example for a model trained on this source: two inputs in the units predict takes."""
    return cfg.example(_shown(Path(cfg.source) if path is None else Path(path)))
