"""Reading a user's files: bytes and their fingerprint, strict UTF-8, delimited tables, numbers, labels.

Every problem is a `PipelineError` of one line that names the file and, where there is one, the column
and the line (1-based, as an editor shows it; a CSV header is line 1).
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import PipelineError
from pipeline.datasets.common import held_out, natural_sorted, split_indices

BOM = "\ufeff"


def show(value: str, limit: int = 30) -> str:
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


def require_file(path: Path, what: str = "file") -> Path:
    if not path.exists():
        raise PipelineError(f"{path}: {what} not found (data.source)")
    if not path.is_file():
        raise PipelineError(f"{path}: not a file; this format reads one {what}")
    return path


def require_folder(path: Path) -> Path:
    if not path.exists():
        raise PipelineError(f"{path}: folder not found (data.source)")
    if not path.is_dir():
        raise PipelineError(f"{path}: not a folder")
    return path


def read_bytes(path: Path) -> bytes:
    data = require_file(path).read_bytes()
    if not data.strip():
        raise PipelineError(f"{path}: empty file" if not data else f"{path}: empty file (whitespace only)")
    return data


def fingerprint(source: Path, fmt: str, files: Sequence[Path], contents: Sequence[bytes] | None = None) -> dict:
    """The manifest's `source`: the path as given, its format, sha256 and size in bytes.

    A file's sha256 is the hash of its bytes; a folder's is the hash of one line per file in sorted order,
    `<path relative to the folder>\\0<sha256 of the file>\\n`, so renaming or editing any file changes it."""
    if contents is None:
        contents = [f.read_bytes() for f in files]
    hashes = [hashlib.sha256(c).hexdigest() for c in contents]
    entry = {"path": source.as_posix(), "format": fmt, "bytes": int(sum(len(c) for c in contents))}
    if source.is_dir():
        digest = hashlib.sha256()
        for f, h in zip(files, hashes):
            digest.update(f"{f.relative_to(source).as_posix()}\0{h}\n".encode())
        entry.update(sha256=digest.hexdigest(), files=len(files))
    else:
        entry["sha256"] = hashes[0]
    return entry


def decode(path: Path, data: bytes) -> str:
    """Strict UTF-8 (a leading byte-order mark dropped), Windows line ends made "\\n"."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise PipelineError(f"{path}: not UTF-8 text: byte 0x{data[err.start]:02x} at line {line} "
                            "(save the file as UTF-8)") from None
    return text.removeprefix(BOM).replace("\r\n", "\n")


@dataclass
class Table:
    """A delimited text file: its header and its data rows, each with the line it starts on."""

    path: Path
    header: list[str]
    rows: list[list[str]]
    lines: list[int]

    def index(self, name: str | int, param: str) -> int:
        """The position of column `name` (a header name, or a 0-based position for a file without header)."""
        if isinstance(name, int):
            if not 0 <= name < len(self.header):
                raise PipelineError(f"{self.path}: no column {name} ({param}); the file has {len(self.header)} "
                                    f"columns, numbered from 0")
            return name
        if name not in self.header:
            hint = next((f" (is the delimiter {d!r}? set data.delimiter)" for d in (";", "\t", "|", ",")
                         if len(self.header) == 1 and d in self.header[0]), "")
            raise PipelineError(f"{self.path}: no column {name!r} ({param}); the columns are "
                                f"{', '.join(map(repr, self.header))}{hint}")
        return self.header.index(name)

    def name(self, column: int) -> str:
        return repr(self.header[column])

    def cells(self, column: int) -> list[str]:
        return [row[column] for row in self.rows]

    def numbers(self, column: int) -> np.ndarray:
        """The column as float64; an empty cell, a word or a non-finite number is an error naming its line."""
        cells = self.cells(column)
        try:
            values = np.array(cells, dtype=np.float64)
        except ValueError:
            values = None
        bad = None
        if values is None:
            for i, cell in enumerate(cells):
                try:
                    float(cell)
                except ValueError:
                    bad = i
                    break
        elif not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
        if bad is not None:
            cell = cells[bad].strip()
            what = "an empty cell" if not cell else f"{show(cell)} is not a finite number"
            raise PipelineError(f"{self.path}: column {self.name(column)}, line {self.lines[bad]}: {what} "
                                "(features must be numbers: fix the cell, or list the others in data.feature_columns)")
        return values

    def labels(self, column: int) -> tuple[np.ndarray, list[str]]:
        """Class ids (N,) int64 into the sorted label names (numbers by value): at least two classes."""
        cells = [c.strip() for c in self.cells(column)]
        for i, cell in enumerate(cells):
            if not cell:
                raise PipelineError(f"{self.path}: column {self.name(column)}, line {self.lines[i]}: empty label")
        names = natural_sorted(cells)
        one_class(self.path, f"column {self.name(column)}", names)
        index = {n: i for i, n in enumerate(names)}
        return np.array([index[c] for c in cells], dtype=np.int64), names


def one_class(path: Path, where: str, names: Sequence[str]) -> None:
    if len(names) < 2:
        raise PipelineError(f"{path}: {where} holds one class ({names[0]!r}); a classifier needs at least two")


def read_table(path: Path, delimiter: str, header: bool = True) -> Table:
    """Rows of a delimited UTF-8 file (csv module quoting rules). Blank lines are skipped; every row must have
    as many fields as the first."""
    text = decode(path, read_bytes(path))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows, lines = [], []
    start = 1
    try:
        for row in reader:
            if row and any(cell.strip() for cell in row):
                rows.append(row)
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as err:
        raise PipelineError(f"{path}: line {reader.line_num}: {err}") from None
    if not rows:
        raise PipelineError(f"{path}: empty file")
    if header:
        names, rows, lines = [c.strip() for c in rows[0]], rows[1:], lines[1:]
        if not rows:
            raise PipelineError(f"{path}: a header and no data rows")
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise PipelineError(f"{path}: column {doubled[0]!r} appears twice in the header")
    else:
        names = [str(i) for i in range(len(rows[0]))]
    for row, line in zip(rows, lines):
        if len(row) != len(names):
            sep = "tab" if delimiter == "\t" else repr(delimiter)
            raise PipelineError(f"{path}: line {line} has {len(row)} fields, the {'header' if header else 'first row'}"
                                f" {len(names)} (delimiter {sep})")
    return Table(path, names, rows, lines)


def splits(path: Path, n: int, unit: str, val_fraction: float, test_fraction: float, rng: np.random.Generator,
           labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """`split_indices` with an error that names the file when `n` items cannot fill every split."""
    need = held_out(n, val_fraction) + held_out(n, test_fraction) + 1
    if n < max(need, 3 if test_fraction > 0 else 2):
        raise PipelineError(f"{path}: {n} {unit} are too few for val_fraction={val_fraction}, "
                            f"test_fraction={test_fraction} (every split needs at least one)")
    return split_indices(n, val_fraction, test_fraction, rng, labels=labels)


def standardise(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (float64) over the training rows (N, F); a constant feature gets std 1."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)
