"""``whisper-orpo make-pairs``: preference pairs from a plain ASR manifest (see :mod:`orpo.pairs.make_pairs`)."""

from __future__ import annotations

import sys

from orpo.config import MakePairsConfig, parse_args
from orpo.errors import run_command

PROG = "whisper-orpo make-pairs"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    def command():
        cfg = parse_args(argv, MakePairsConfig, prog)
        from orpo.pairs.make_pairs import make_pairs_from_config

        make_pairs_from_config(cfg)

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
