"""``python -m orpo.plots``: the same as ``whisper-orpo plot`` (see :mod:`orpo.cli.plot`)."""

import sys

from orpo.cli.plot import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m orpo.plots"))
