"""``whisper-orpo plot OUTPUT_DIR``: training_curves.png of a run from its metrics.jsonl."""

from __future__ import annotations

import sys

from orpo.config import PlotConfig, parse_args
from orpo.errors import ConfigError, run_command

PROG = "whisper-orpo plot"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    def command():
        cfg = parse_args(argv, PlotConfig, prog)
        from orpo.train.plots import plot_training_curves

        try:
            print(plot_training_curves(cfg.output_dir))
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
