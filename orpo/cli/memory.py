"""``whisper-orpo memory``: model-state memory per GPU (16-bit weights and gradients, fp32 Adam states) of each
launch configuration, for a full fine-tune. Activations come on top."""

from __future__ import annotations

import sys

from orpo.config import MemoryConfig, parse_args
from orpo.errors import run_command
from orpo.scale.memory import print_memory_table

PROG = "whisper-orpo memory"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return run_command(lambda: print_memory_table(parse_args(argv, MemoryConfig, prog)))


if __name__ == "__main__":
    sys.exit(main())
