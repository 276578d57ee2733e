"""Every error a user can cause, and the one place that turns an error into an exit code.

A user error (a bad recipe, manifest, checkpoint or export folder, a full disk) is a :class:`UserError`: the
command prints ``error: <message>`` and exits with status 2, before any weights load where it can.
A run that started but cannot go on (:class:`NonFiniteLossError`) exits with status 1.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(ValueError):
    """Something the user can fix; the message says what is wrong, where, and how to fix it."""


class ConfigError(UserError):
    """A recipe or command-line value that cannot be used; ``key`` names the offending key when known."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class ManifestError(UserError):
    """A manifest line or dataset row that cannot be trained on."""


class AugmentConfigError(ConfigError):
    """A problem in the augmentation file; the message names the file and the key."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from (missing, incomplete, or written with other settings)."""


class OutputDirError(ConfigError):
    """An output_dir a run may not write into: a file, read-only, in use by another run, or holding an earlier
    run that this one would replace."""

    def __init__(self, message: str):
        super().__init__(message, key="output_dir")


class ExportError(UserError):
    """A directory that cannot be turned into a model, with what to do about it."""


class DiskFullError(UserError):
    """A save that ran out of disk space (ENOSPC, EDQUOT): what it needed, what was free, what was cleaned up."""


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN or Inf loss."""


USER_ERROR_EXIT, RUN_FAILED_EXIT = 2, 1


def run_command(command: Callable[[], int | None]) -> int:
    """Run a command's body; a user error or a failed run becomes ``error: ...`` on stderr and its exit code."""
    try:
        return command() or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return RUN_FAILED_EXIT
