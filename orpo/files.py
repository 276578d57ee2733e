"""Atomic writes: every file or folder a run leaves is written beside its place, flushed, then renamed in.

A reader (or a crash) sees the old version or the new one, never half of a file. Checkpoints, the final
model's files, exports, evaluation results and plots all go through here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames into it) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, flush it and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        yield tmp
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def fresh_staging_dir(path: str | Path) -> Path:
    """An empty folder at ``path`` (whatever an interrupted earlier write left there is removed)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish_dir(staging: Path, final: Path, aside: Path | None = None) -> None:
    """Flush ``staging`` and rename it to ``final``; an existing ``final`` is moved ``aside`` first, removed after."""
    fsync_tree(staging)
    old = None
    if final.exists():
        old = aside or final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_files(staging: Path, folder: Path) -> None:
    """Move every entry of ``staging`` into ``folder``, each by an atomic rename, then remove ``staging``.

    Used where the target folder holds other files too (a run's output_dir): each file is whole at all
    times, though a crash between two renames leaves some files new and some old.
    """
    for entry in staging.iterdir():
        target = folder / entry.name
        if entry.is_dir():
            publish_dir(entry, target)  # flushes the folder itself
            continue
        if target.is_dir():
            shutil.rmtree(target)
        with entry.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(entry, target)
    staging.rmdir()
    fsync_dir(folder)
