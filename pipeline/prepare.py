"""Stage `prepare`: build one task's data from its package and save it to data/prepared/<task>.

numpy only: no torch, no Lightning. The task's source (pipeline.sources: a built-in module or the user's
files) builds a `Prepared`, written atomically by `save_prepared`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params
from pipeline.datasets.prepared import SPLITS, save_prepared
from pipeline.tasks import get_task

PREPARED_ROOT = Path("data/prepared")


def vocab_sizes(vocab: dict) -> dict[str, int]:
    """Sizes of the vocab's string lists (tokens, labels, chars), not of its numbers (mean, std)."""
    return {
        key: len(value)
        for key, value in sorted(vocab.items())
        if isinstance(value, list) and all(isinstance(v, str) for v in value)
    }


def prepare(task: str, params: Params, root: str | Path = PREPARED_ROOT) -> dict:
    """Build `task`'s data with `params` and save it to root/task; return the manifest."""
    spec = get_task(task, params)
    prepared = spec.source.build(spec.section.data, params.seed)
    # the manifest names the topology: DVC's hash of the folder changes with it, so train@<task> reruns
    prepared.stats = {**prepared.stats, "vocab_sizes": vocab_sizes(prepared.vocab), "topology": spec.topology_name}
    return save_prepared(prepared, Path(root) / task)


def summary(task: str, manifest: dict) -> str:
    """One line: counts per split, sequence lengths, vocabulary sizes, source, hash."""
    counts = manifest.get("counts", {})
    unit = manifest.get("unit", "samples")
    parts = [f"{task}: " + " / ".join(f"{s} {counts[s]:,}" for s in SPLITS if s in counts) + f" {unit}"]
    if lengths := manifest.get("sequence_lengths", {}).get("train"):
        parts.append(f"train length {lengths['min']}-{lengths['max']} (mean {lengths['mean']})")
    if sizes := manifest.get("vocab_sizes"):
        parts.append("vocab " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    src = manifest.get("source", {})
    if src.get("package"):  # a built-in source: the package that ships the data
        parts.append(f"from {src['package']} {src.get('version', '')}".rstrip())
    elif src.get("path"):  # the user's file or folder, as params.yaml names it
        parts.append(f"from {src['path']} ({src.get('format', 'file')})")
    parts.append(f"sha256 {manifest.get('content_sha256', '')[:12]}")
    return "; ".join(parts)
