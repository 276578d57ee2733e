"""``whisper-orpo train`` (and ``python train.py``): preference-tune Whisper with ORPO from a recipe."""

from __future__ import annotations

import sys

from orpo.config import TrainConfig, parse_args
from orpo.errors import run_command

PROG = "whisper-orpo train"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    def command():
        cfg = parse_args(argv, TrainConfig, prog)
        from orpo.train.compare import train_and_compare

        train_and_compare(cfg)

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
