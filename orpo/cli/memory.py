"""``whisper-orpo memory``: model-state memory per GPU (16-bit weights and gradients, fp32 Adam states) of each
launch configuration, for a full fine-tune. Activations come on top."""

from __future__ import annotations

import sys

from orpo.config import MemoryConfig, parse_args
from orpo.errors import ConfigError, run_command
from orpo.scale.memory import MODEL_PARAMETERS, memory_table

PROG = "whisper-orpo memory"


def print_memory_table(cfg: MemoryConfig) -> None:
    for name in cfg.memory:
        if name not in MODEL_PARAMETERS:
            try:
                float(name)
            except ValueError:
                raise ConfigError(
                    f"memory: unknown model {name!r}; one of {', '.join(MODEL_PARAMETERS)} or a parameter count",
                    key="memory",
                ) from None
    models = cfg.memory or list(MODEL_PARAMETERS)
    print(
        f"Model states per GPU with {cfg.gpus} GPU{'s' if cfg.gpus > 1 else ''} (full fine-tune, AdamW; "
        "activations not included):\n"
    )
    print(memory_table(models, cfg.gpus))


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return run_command(lambda: print_memory_table(parse_args(argv, MemoryConfig, prog)))


if __name__ == "__main__":
    sys.exit(main())
