"""Atomic writes: every file or folder a run leaves is written beside its place, flushed, then renamed in.

A reader (or a crash) sees the old version or the new one, never half of a file. Checkpoints, the final
model's files, exports, evaluation results and plots all go through here. A write that fills its disk is a
:class:`~orpo.errors.DiskFullError` saying what it needed and what was free, its half-written files removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from orpo.errors import DiskFullError, UserError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# safetensors keeps only the operating system's message of the error (its own error type has no errno)
DISK_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded")
FULL_BELOW = 1 << 20  # a filesystem with fewer bytes free than this is full


def existing_ancestor(path: str | Path) -> Path:
    """``path`` or its nearest parent that exists (where ``mkdir(parents=True)`` would start)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Free bytes (for this user) on the filesystem of ``path``, or of its nearest folder that exists."""
    return shutil.disk_usage(existing_ancestor(path)).free


def is_disk_full(err: BaseException, folder: str | Path) -> bool:
    """Whether ``err``, raised while writing into ``folder``, means that its filesystem is full.

    The errno is anywhere in the error's chain, or only in a message (safetensors). PyTorch's zip writer
    (``torch.save``) loses it altogether ("unexpected pos ..."), so a RuntimeError with the filesystem full
    right after it counts too.
    """
    seen, chain = set(), err
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(chain) for text in DISK_FULL_MESSAGES):
            return True
        chain = chain.__cause__ or chain.__context__
    return isinstance(err, RuntimeError) and free_bytes(folder) < FULL_BELOW


def format_bytes(count: int) -> str:
    return f"{count:,} bytes ({count / 2**20:.1f} MiB)"


@contextlib.contextmanager
def disk_full_guard(
    folder: str | Path, what: str, needed: Callable[[], tuple[int, str]], remove: Path | None = None
) -> Iterator[None]:
    """Writing ``what`` into ``folder``: a full disk becomes a DiskFullError with the bytes ``needed()`` gives
    (the count, and how it was made: asked for only then), and any error removes the half-written ``remove``."""
    try:
        yield
    except Exception as err:
        full = isinstance(err, DiskFullError) or (not isinstance(err, UserError) and is_disk_full(err, folder))
        count, basis = needed() if full else (0, "")
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
        if not full:
            raise
        removed = f" The partly written {remove} was removed." if remove is not None else ""
        raise DiskFullError(
            f"no space left on the device of {folder}: {what} needs about {format_bytes(count)} ({basis}); "
            f"{format_bytes(free_bytes(folder))} are free there.{removed} Free some space there, or write to a "
            "larger disk, and run again."
        ) from err


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
def staged_file(path: str | Path, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, flush it and rename it onto ``path``.

    ``size``: the bytes the block writes, for the message when the disk fills (else what it wrote until then).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")

    def needed() -> tuple[int, str]:
        if size is not None:
            return size, "the file's size"
        return (tmp.stat().st_size if tmp.exists() else 0), "at least: what was written before the disk filled"

    try:
        with disk_full_guard(path.parent, path.name, needed):
            yield tmp
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    data = text.encode("utf-8")
    with staged_file(path, size=len(data)) as tmp:
        tmp.write_bytes(data)
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
    try:
        os.replace(staging, final)
    except OSError:
        if old is not None:  # the folder that was there stays
            os.replace(old, final)
        raise
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
