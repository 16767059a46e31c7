"""Folders written all at once: every stage output is built aside and swapped in with one rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import PipelineError


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh folder next to `target`. If the block succeeds, the folder replaces `target`;
    if it fails, or the swap itself fails, `target` is left as it was and the folder is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        old = None
        if target.exists() or target.is_symlink():
            if not target.is_dir():
                raise PipelineError(f"{target} exists and is not a folder")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old / "previous", target)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap


def check_file_targets(*paths: str | Path) -> None:
    """Before a stage computes anything: each output file's path is free or a file (PipelineError naming the
    first that is a folder), so a run cannot fail at its last step with half of its outputs written."""
    for path in map(Path, paths):
        if path.is_dir():
            raise PipelineError(f"{path} is a folder: the output file cannot be written there")


def write_file_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `path` whole or not at all: a temporary sibling renamed into place, removed if anything fails."""
    path = Path(path)
    check_file_targets(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
