"""``python -m orpo.export``: the same as ``whisper-orpo export`` (see :mod:`orpo.cli.export`)."""

import sys

from orpo.cli.export import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m orpo.export"))
