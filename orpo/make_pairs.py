"""``python -m orpo.make_pairs``: the same as ``whisper-orpo make-pairs`` (see :mod:`orpo.cli.make_pairs`)."""

import sys

from orpo.cli.make_pairs import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m orpo.make_pairs"))
