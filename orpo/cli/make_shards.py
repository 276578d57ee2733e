"""``whisper-orpo make-shards``: a preference manifest as WebDataset tar shards (see :mod:`orpo.data.shards`)."""

from __future__ import annotations

import sys

from orpo.config import MakeShardsConfig, parse_args
from orpo.errors import run_command

PROG = "whisper-orpo make-shards"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    def command():
        cfg = parse_args(argv, MakeShardsConfig, prog)
        from orpo.data.shards import write_shards

        shards = write_shards(cfg.manifest, cfg.out, cfg.samples_per_shard, cfg.overwrite)
        print(
            f"wrote {len(shards)} shards to {cfg.out}; train on them with --train_data '{cfg.out}/*.tar' "
            "--streaming true --max_steps N"
        )

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
