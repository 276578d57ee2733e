"""``whisper-orpo COMMAND ...``: one entry point for every command (``pyproject.toml``'s console script)."""

from __future__ import annotations

import sys

from orpo.cli import evaluate, export, fetch_model, make_pairs, make_shards, memory, plot, train

COMMANDS = {
    "train": train,
    "evaluate": evaluate,
    "make-pairs": make_pairs,
    "make-shards": make_shards,
    "export": export,
    "plot": plot,
    "memory": memory,
    "fetch-model": fetch_model,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        usage = "usage: whisper-orpo {" + ",".join(COMMANDS) + "} [--help | --config FILE] [--key value ...]"
        if argv and argv[0] in ("-h", "--help"):
            print(
                usage
                + "\n\n"
                + "\n".join(
                    f"  {name:<11} {(module.__doc__ or '').strip().splitlines()[0]}"
                    for name, module in COMMANDS.items()
                )
            )
            return 0
        print(usage + (f"\nerror: unknown command {argv[0]!r}" if argv else ""), file=sys.stderr)
        return 2
    module = COMMANDS[argv[0]]
    return module.main(argv[1:], prog=f"whisper-orpo {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
