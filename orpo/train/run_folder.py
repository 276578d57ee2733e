"""A run's ``output_dir``: checked before anything is written, locked for the life of the run, an earlier run kept.

:func:`check_output_dir` only reads: a run that stops at any check leaves the folder as it found it.
:class:`RunLock` then holds ``output_dir/run.lock`` with an exclusive ``flock``, which the kernel releases when
the process ends however it ends, so a second run on the same folder stops at once and a lock left by a killed
run is taken over (and named). A fresh run told to ``overwrite_output_dir`` moves the earlier run's files into
``output_dir/replaced/<UTC time>/`` (:func:`move_earlier_run`); nothing is deleted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from orpo.errors import OutputDirError
from orpo.files import existing_ancestor

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
REPLACED = "replaced"
TELLING = ("metrics.jsonl", "train.log", "config.yaml", "model.safetensors", "adapter_model.safetensors")  # named first


def earlier_run(output_dir: Path) -> list[str]:
    """What an earlier run (or anything else) left in ``output_dir``, the lock and replaced runs aside."""
    if not output_dir.is_dir():
        return []
    names = [p.name for p in output_dir.iterdir() if p.name not in (LOCK_NAME, REPLACED)]
    return sorted(names, key=lambda name: (name not in TELLING and not name.startswith("checkpoint-"), name))


def check_output_dir(output_dir: Path, resuming: bool, overwrite: bool) -> None:
    """``output_dir`` can hold this run: a folder (or creatable), writable, not in use, and, for a fresh run,
    holding no earlier run unless ``overwrite`` says to move it aside. Reads only."""
    start = existing_ancestor(output_dir)
    if not start.is_dir():
        what = "is a file" if start == output_dir.absolute() else f"cannot be made: {start} is a file"
        raise OutputDirError(f"output_dir {output_dir} {what}, not a folder: choose another output_dir")
    if os.statvfs(start).f_flag & os.ST_RDONLY:
        raise OutputDirError(f"output_dir {output_dir}: {start} is on a read-only file system; choose a writable one")
    if not os.access(start, os.W_OK | os.X_OK):
        raise OutputDirError(f"output_dir {output_dir}: {start} is not writable by this user; choose another")
    holder = RunLock(output_dir).holder()
    if holder is not None:
        raise OutputDirError(RunLock.busy_message(output_dir, holder))
    found = earlier_run(output_dir)
    if found and not resuming and not overwrite:
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise OutputDirError(
            f"output_dir {output_dir} holds an earlier run ({shown}); a fresh run would replace it. To continue "
            "that run, add --resume_from_checkpoint latest; to start afresh and keep it, add --overwrite_output_dir "
            f"true (its files move to {output_dir / REPLACED}/<time>/); or choose another output_dir"
        )


def move_earlier_run(output_dir: Path) -> Path | None:
    """Move what :func:`earlier_run` lists into ``output_dir/replaced/<UTC time>/`` (said in the log)."""
    found = earlier_run(output_dir)
    if not found:
        return None
    target = output_dir / REPLACED / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target.mkdir(parents=True, exist_ok=False)
    for name in found:
        os.replace(output_dir / name, target / name)
    logger.warning("overwrite_output_dir: the earlier run's files (%s) moved to %s", ", ".join(found), target)
    return target


class RunLock:
    """``output_dir/run.lock``: an exclusive ``flock`` held from :meth:`acquire` to :meth:`release`, the file
    naming its holder (pid, host, start time, command) for the error another run shows."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd: int | None = None

    @staticmethod
    def _record(fd: int) -> dict | None:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            record = json.loads(os.read(fd, 65536).decode("utf-8") or "null")
        except (UnicodeDecodeError, ValueError):
            return {"pid": "?", "host": "?", "note": "unreadable lock record"}
        return record if isinstance(record, dict) else None

    @staticmethod
    def describe(record: dict) -> str:
        return (
            f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}, "
            f"command: {record.get('command')}"
        )

    @classmethod
    def busy_message(cls, output_dir: Path, holder: dict) -> str:
        return (
            f"output_dir {output_dir} is in use by another run ({cls.describe(holder)}); two runs on one folder "
            "would interleave their metrics and replace each other's checkpoints. Wait for it to end or choose "
            f"another output_dir. If that process no longer exists (its lock is on a file system where locks do "
            f"not reach this host), delete {Path(output_dir) / LOCK_NAME}"
        )

    def holder(self) -> dict | None:
        """The record of a run holding the lock now, else None (tested with a shared lock, dropped at once)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._record(fd) or {}
        finally:
            os.close(fd)  # closing drops a lock taken here
        return None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`OutputDirError` naming the run that holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = self._record(fd) or {}
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise OutputDirError(self.busy_message(self.path.parent, holder)) from None
                raise OutputDirError(
                    f"cannot lock {self.path}: {err}. The file system of output_dir does not support file locks "
                    "(flock); put output_dir on one that does"
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder released (removed) the file between our open and flock: take the new one
        previous = self._record(fd)
        if previous:
            logger.warning(
                "%s was left by a run that no longer holds it (%s): it ended without releasing the lock (killed, "
                "or its node was lost); taking it over",
                self.path,
                self.describe(previous),
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """Remove the file while still holding the lock, then drop it (a run waiting on it opens a new file)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
