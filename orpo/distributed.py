"""``python -m orpo.distributed``: the same as ``whisper-orpo memory`` (see :mod:`orpo.cli.memory`)."""

import sys

from orpo.cli.memory import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m orpo.distributed"))
