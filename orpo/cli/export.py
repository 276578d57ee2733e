"""``whisper-orpo export``: a merged Hugging Face model from a run's output, adapter or checkpoint; optionally
a CTranslate2 model for faster-whisper, loaded back and checked on one clip."""

from __future__ import annotations

import sys

from orpo.config import ExportConfig, parse_args
from orpo.errors import run_command

PROG = "whisper-orpo export"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    def command():
        cfg = parse_args(argv, ExportConfig, prog)
        from orpo.artifacts.export import export_from_config

        export_from_config(cfg)

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
