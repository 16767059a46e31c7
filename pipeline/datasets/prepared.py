"""The prepared-data format every task shares: arrays per split, a vocabulary, a manifest.

    data/prepared/<task>/
        train.npz, val.npz, test.npz   arrays whose first axis is the sample (no pickles)
        vocab.json                     tokens, label names: what a model needs to size itself
        manifest.json                  counts, length stats, source package/version/license, hash

Writes are atomic: everything goes to a sibling temporary folder that replaces the old
output in one rename, so an interrupted `prepare` leaves the previous output or nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_dir
from pipeline.config import PipelineError

SPLITS = ("train", "val", "test")


@dataclass
class Prepared:
    splits: dict[str, dict[str, np.ndarray]]  # split -> name -> array (first axis: sample)
    vocab: dict  # JSON-serialisable
    source: dict  # package, version, license, what was taken from it
    stats: dict = field(default_factory=dict)  # extra manifest entries (length stats, ...)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz whose bytes depend only on the arrays (fixed zip timestamps): reproducible hashes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def _length_stats(arrays: dict[str, np.ndarray]) -> dict:
    lengths = next((arrays[k] for k in ("lengths", "src_lengths") if k in arrays), None)
    if lengths is None or len(lengths) == 0:
        return {}
    return {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 2), "max": int(lengths.max())}


def save_prepared(prepared: Prepared, out_dir: str | Path) -> dict:
    """Write `prepared` to `out_dir` atomically; return the manifest."""
    digest = hashlib.sha256()
    counts, lengths = {}, {}
    with atomic_dir(out_dir) as tmp:
        for split, arrays in sorted(prepared.splits.items()):
            blob = _npz_bytes(arrays)
            digest.update(split.encode() + blob)
            (tmp / f"{split}.npz").write_bytes(blob)
            counts[split] = int(len(next(iter(arrays.values())))) if arrays else 0
            if stats := _length_stats(arrays):
                lengths[split] = stats
        vocab_text = json.dumps(prepared.vocab, indent=1, sort_keys=True, ensure_ascii=False)
        digest.update(vocab_text.encode())
        (tmp / "vocab.json").write_text(vocab_text)
        manifest = {
            "counts": counts,
            "sequence_lengths": lengths,
            "source": prepared.source,
            **prepared.stats,
            "content_sha256": digest.hexdigest(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False))
    return manifest


def _require(path: Path) -> Path:
    if not path.exists():
        raise PipelineError(f"{path}: prepared data not found; run `dvc repro prepare@{path.parent.name}`")
    return path


def load_split(data_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    with np.load(_require(Path(data_dir) / f"{split}.npz"), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def load_vocab(data_dir: str | Path) -> dict:
    return json.loads(_require(Path(data_dir) / "vocab.json").read_text())


def load_manifest(data_dir: str | Path) -> dict:
    return json.loads(_require(Path(data_dir) / "manifest.json").read_text())
