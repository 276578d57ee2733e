"""``whisper-orpo evaluate``: WER/CER of generated transcripts and the ORPO preference metrics of a model."""

from __future__ import annotations

import sys

from orpo.config import EvaluateConfig, parse_args
from orpo.errors import run_command

PROG = "whisper-orpo evaluate"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    def command():
        cfg = parse_args(argv, EvaluateConfig, prog)
        from orpo.artifacts.evaluate_model import evaluate_model

        evaluate_model(cfg)

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
