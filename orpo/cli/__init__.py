"""Commands: argument parsing and exit codes only; each calls into the package.

Heavy modules (torch, transformers) are imported inside each command's ``run``, after its arguments are
parsed, so ``--help`` and argument errors answer at once.
"""
