"""Numeric sources: labelled series (a folder of .npy files per label, or a .ts file), per-step CSV
rows grouped into sequences, and tabular CSV rows. Features are standardised with the training split's
per-channel mean and std, which the vocabulary keeps for predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import PipelineError, first_line
from pipeline.datasets.common import natural_sorted, pad, require_module
from pipeline.datasets.files.reading import (
    Table,
    decode,
    fingerprint,
    one_class,
    read_bytes,
    read_table,
    require_folder,
    splits,
    standardise,
)
from pipeline.datasets.prepared import Prepared

# --- many_to_one: labelled series -------------------------------------------------------------------


def _trimmed(series: np.ndarray, where: str) -> np.ndarray:
    """(T, C) float64 without its trailing all-NaN steps (padding); a NaN or inf left inside is an error."""
    finite = np.isfinite(series)
    real = np.flatnonzero(finite.any(axis=1))
    series = series[: real[-1] + 1] if len(real) else series[:0]
    if not len(series):
        raise PipelineError(f"{where}: an empty series (no finite step)")
    if not np.isfinite(series).all():
        step = int(np.flatnonzero(~np.isfinite(series).all(axis=1))[0])
        raise PipelineError(f"{where}: a missing or non-finite value at step {step} (only trailing NaN steps, "
                            "padding, are allowed)")
    return series


def _npy_folder(source: Path) -> tuple[list[np.ndarray], list[str], list[Path]]:
    """Series from `source/<label>/*.npy`: each (T,) or (T, C), any numeric dtype."""
    require_folder(source)
    stray = sorted(p.name for p in source.glob("*.npy"))
    if stray:
        raise PipelineError(f"{source}: {stray[0]} lies in the top folder; put each series in a folder named "
                            "for its label (<source>/<label>/<name>.npy)")
    series, names, files = [], [], []
    for folder in sorted((p for p in source.iterdir() if p.is_dir()), key=lambda p: p.name):
        found = sorted(folder.glob("*.npy"), key=lambda p: p.name)
        if not found:
            raise PipelineError(f"{folder}: no .npy files in this label's folder")
        for path in found:
            try:
                array = np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as err:
                raise PipelineError(f"{path}: not a readable .npy array ({first_line(err)})") from None
            if array.ndim not in (1, 2) or array.dtype.kind not in "biuf":
                raise PipelineError(f"{path}: expected a numeric (T,) or (T, channels) array, got "
                                    f"{array.dtype} {array.shape}")
            series.append(_trimmed(array.astype(np.float64).reshape(len(array), -1), str(path)))
            names.append(folder.name)
            files.append(path)
    if not series:
        raise PipelineError(f"{source}: no label folders with .npy files (<source>/<label>/<name>.npy)")
    return series, names, files


def _ts_file(source: Path) -> tuple[list[np.ndarray], list[str], list[Path]]:
    """Series from an aeon/sktime .ts file (read by aeon.datasets.load_from_ts_file), with class labels."""
    decode(source, read_bytes(source))  # the empty-file and UTF-8 errors, before aeon
    datasets = require_module("aeon.datasets", "pip install aeon")
    try:
        x, y, meta = datasets.load_from_ts_file(str(source), return_meta_data=True)
    except Exception as err:  # aeon raises IOError, ValueError, IndexError... on a malformed file
        raise PipelineError(f"{source}: not a readable .ts file ({first_line(err)})") from None
    if not meta.get("classlabel") or y is None or len(y) != len(x):
        raise PipelineError(f"{source}: no class labels (the header needs `@classLabel true <labels>`)")
    series = [_trimmed(np.asarray(s, dtype=np.float64).T, f"{source}: series {i + 1}") for i, s in enumerate(x)]
    return series, [str(v) for v in y], [source]


def build_series(cfg, seed: int, path: Path) -> Prepared:
    """x (N, T, C) float32 standardised per channel and zero-padded, lengths (N,), y (N,): as the gesture task."""
    source = path
    if source.suffix.lower() == ".ts" and not source.is_dir():
        series, names, files = _ts_file(source)
        fmt = "series_ts"
    else:
        series, names, files = _npy_folder(source)
        fmt = "series_npy"
    channels = {s.shape[1] for s in series}
    if len(channels) > 1:
        first = next(i for i, s in enumerate(series) if s.shape[1] != series[0].shape[1])
        raise PipelineError(f"{files[first] if len(files) > 1 else source}: {series[first].shape[1]} channels, "
                            f"the first series {series[0].shape[1]}; every series needs the same channels")
    labels = natural_sorted(names)
    one_class(source, "the labels", labels)
    y = np.array([labels.index(n) for n in names], dtype=np.int64)
    rng = np.random.default_rng(seed)
    parts = splits(source, len(y), "series", cfg.val_fraction, cfg.test_fraction, rng, labels=y)
    mean, std = standardise(np.concatenate([series[i] for i in parts["train"]]))
    arrays = {}
    for split, idx in parts.items():
        x, lengths = pad([((series[i] - mean) / std).astype(np.float32) for i in idx], dtype=np.float32)
        arrays[split] = {"x": x, "lengths": lengths, "y": y[idx]}
    return Prepared(
        splits=arrays,
        vocab={"labels": labels, "mean": mean.tolist(), "std": std.tolist()},
        source={**fingerprint(source, fmt, files), "what": "the user's labelled series"},
        stats={"unit": "series", "rows": len(y), "channels": int(series[0].shape[1]),
               "class_counts": {n: int(c) for n, c in zip(labels, np.bincount(y, minlength=len(labels)))}},
    )


# --- many_to_many: a CSV of steps ---------------------------------------------------------------------


def _features(table: Table, exclude: list[int], names: list[str] | None) -> list[int]:
    """The feature columns: those named in data.feature_columns, else every column not excluded."""
    if names is not None:
        columns = [table.index(n, "data.feature_columns") for n in names]
        taken = sorted(set(columns) & set(exclude))
        if taken:
            raise PipelineError(f"{table.path}: column {table.name(taken[0])} is both a feature and the label, "
                                "sequence or order column")
    else:
        columns = [i for i in range(len(table.header)) if i not in exclude]
    if not columns:
        raise PipelineError(f"{table.path}: no feature columns (only {', '.join(map(repr, table.header))})")
    return columns


def build_steps(cfg, seed: int, path: Path) -> Prepared:
    """x (N, T, C) float32, y (N, T) int64, lengths (N,): one sequence per sequence id, as the activity task."""
    source = path
    table = read_table(source, cfg.delimiter)
    seq_col = table.index(cfg.sequence_column, "data.sequence_column")
    label_col = table.index(cfg.label_column, "data.label_column")
    order_col = table.index(cfg.order_column, "data.order_column") if cfg.order_column is not None else None
    exclude = [seq_col, label_col] + ([order_col] if order_col is not None else [])
    columns = _features(table, exclude, cfg.feature_columns)
    features = np.stack([table.numbers(c) for c in columns], axis=1)  # (rows, C)
    y, labels = table.labels(label_col)
    ids = [c.strip() for c in table.cells(seq_col)]
    for i, value in enumerate(ids):
        if not value:
            raise PipelineError(f"{source}: column {table.name(seq_col)}, line {table.lines[i]}: empty sequence id")
    order = table.numbers(order_col) if order_col is not None else np.arange(len(ids), dtype=np.float64)
    groups: dict[str, list[int]] = {}
    for row, value in enumerate(ids):  # sequences in the order of their first row
        groups.setdefault(value, []).append(row)
    rows = [np.asarray(r)[np.argsort(order[r], kind="stable")] for r in groups.values()]
    rng = np.random.default_rng(seed)
    parts = splits(source, len(rows), "sequences", cfg.val_fraction, cfg.test_fraction, rng)
    mean, std = standardise(features[np.concatenate([rows[i] for i in parts["train"]])])
    standard = ((features - mean) / std).astype(np.float32)
    arrays = {}
    for split, idx in parts.items():
        x, lengths = pad([standard[rows[i]] for i in idx], dtype=np.float32)
        steps, _ = pad([y[rows[i]] for i in idx])
        arrays[split] = {"x": x, "y": steps, "lengths": lengths}
    return Prepared(
        splits=arrays,
        vocab={"labels": labels, "features": [table.header[c] for c in columns], "mean": mean.tolist(),
               "std": std.tolist()},
        source={**fingerprint(source, "steps", [source]), "what": "the user's per-step rows",
                "columns": {"sequence": table.header[seq_col], "label": table.header[label_col],
                            "order": table.header[order_col] if order_col is not None else None}},
        stats={"unit": "sequences", "rows": len(ids), "sequences": len(rows), "features": len(columns),
               "class_counts": {n: int(c) for n, c in zip(labels, np.bincount(y, minlength=len(labels)))}},
    )


# --- one_to_one: a tabular CSV ----------------------------------------------------------------------------


def build_table(cfg, seed: int, path: Path) -> Prepared:
    """x (N, F) float32 standardised with the training rows' statistics, y (N,) int64."""
    source = path
    table = read_table(source, cfg.delimiter)
    label_col = table.index(cfg.label_column, "data.label_column")
    columns = _features(table, [label_col], cfg.feature_columns)
    features = np.stack([table.numbers(c) for c in columns], axis=1)
    y, labels = table.labels(label_col)
    rng = np.random.default_rng(seed)
    parts = splits(source, len(y), "rows", cfg.val_fraction, cfg.test_fraction, rng, labels=y)
    mean, std = standardise(features[parts["train"]])
    standard = ((features - mean) / std).astype(np.float32)
    return Prepared(
        splits={split: {"x": standard[idx], "y": y[idx]} for split, idx in parts.items()},
        vocab={"labels": labels, "features": [table.header[c] for c in columns], "mean": mean.tolist(),
               "std": std.tolist()},
        source={**fingerprint(source, "table", [source]), "what": "the user's table",
                "columns": {"label": table.header[label_col]}},
        stats={"unit": "rows", "rows": len(y), "features": len(columns),
               "class_counts": {n: int(c) for n, c in zip(labels, np.bincount(y, minlength=len(labels)))}},
    )


# --- input examples: what the served model's predict takes, in raw units ------------------------------


def _nan_padded(series: list[np.ndarray]) -> np.ndarray:
    """(N, T_max, C) float64, each series followed by NaN steps: the serving contract's padding."""
    x = np.full((len(series), max(len(s) for s in series), series[0].shape[1]), np.nan)
    for row, s in zip(x, series):
        row[: len(s)] = s
    return x


def example_series(cfg, path: Path) -> np.ndarray:
    """The first two series (file order; a folder: by label, then name), NaN-padded: (2, T, C) float64."""
    series, _, _ = _ts_file(path) if path.suffix.lower() == ".ts" and not path.is_dir() else _npy_folder(path)
    return _nan_padded(series[:2])


def example_steps(cfg, path: Path) -> np.ndarray:
    """The first two sequences' raw features in step order, NaN-padded: (2, T, C) float64."""
    table = read_table(path, cfg.delimiter)
    seq_col = table.index(cfg.sequence_column, "data.sequence_column")
    label_col = table.index(cfg.label_column, "data.label_column")
    order_col = table.index(cfg.order_column, "data.order_column") if cfg.order_column is not None else None
    columns = _features(table, [seq_col, label_col] + ([order_col] if order_col is not None else []),
                        cfg.feature_columns)
    features = np.stack([table.numbers(c) for c in columns], axis=1)
    ids = [c.strip() for c in table.cells(seq_col)]
    order = table.numbers(order_col) if order_col is not None else np.arange(len(ids), dtype=np.float64)
    first = list(dict.fromkeys(ids))[:2]
    rows = [np.flatnonzero(np.asarray(ids) == value) for value in first]
    return _nan_padded([features[r[np.argsort(order[r], kind="stable")]] for r in rows])


def example_table(cfg, path: Path):
    """The first two rows' feature columns by name, in raw units: a DataFrame of float64."""
    import pandas as pd

    table = read_table(path, cfg.delimiter)
    label_col = table.index(cfg.label_column, "data.label_column")
    columns = _features(table, [label_col], cfg.feature_columns)
    return pd.DataFrame({table.header[c]: table.numbers(c)[:2] for c in columns})
