"""``python -m orpo.evaluate``: the same as ``whisper-orpo evaluate`` (see :mod:`orpo.cli.evaluate`)."""

import sys

from orpo.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m orpo.evaluate"))
