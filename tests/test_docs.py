"""The README and docs/ stay honest: the README opens with what a user needs first and stays short, its quick
start is the three commands that work on a fresh clone, every link and anchor resolves, every command and flag
quoted in a shell block exists, and no page names a path outside the repository.

The recipe-key table (tests/test_config.py), the model-state tables (tests/test_deepspeed.py) and the Docker
section (tests/test_docker.py) are checked beside the code they document.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from conftest import ROOT
from test_repository import outside_paths

from orpo.cli.main import COMMANDS
from orpo.config import Config, TrainConfig, config_fields

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 250

# What a new user needs first, in this order; the reference material lives in docs/.
README_SECTIONS = ["Requirements", "Quick start", "Your own data", "Commands", "Errors and recovery", "Documentation"]
QUICK_START = [
    "bash scripts/setup.sh && . .venv/bin/activate",
    "python train.py --config recipes/demo.yaml",
    "python -m pytest -q",
]

LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
SUBCOMMAND = re.compile(r"whisper-orpo ([a-z][a-z-]*)")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every markdown heading outside code blocks."""
    return [(len(m.group(1)), m.group(2).strip()) for m in re.finditer(r"^(#{1,6}) (.+)$", FENCE.sub("", text), re.M)]


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, title in headings(path.read_text()):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def shell_lines(path: Path) -> list[str]:
    """The command lines of a page's bash blocks, continuation lines joined and comments dropped."""
    lines = []
    for lang, body in FENCE.findall(path.read_text()):
        if lang not in ("bash", "sh"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def config_of(command: str) -> type[Config]:
    """The Config class a ``whisper-orpo`` subcommand parses its keys with."""
    module = COMMANDS[command]
    found = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Config) and v is not Config]
    assert len(found) == 1, (command, found)
    return found[0]


def quoted_invocations(line: str) -> list[tuple[str, type[Config], list[str]]]:
    """(program, config class, its argument tokens) for each whisper-orpo / train.py / -m orpo.X in ``line``."""
    try:
        tokens = [t.strip("[]") for t in shlex.split(line)]
    except ValueError:  # a line of a here-document (JSON), not a command
        return []
    found, i = [], 0
    while i < len(tokens):
        token, following = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else ""
        target = None
        if token == "whisper-orpo" and following in COMMANDS:
            target, i = (f"whisper-orpo {following}", config_of(following)), i + 1
        elif token.endswith("train.py"):
            target = ("train.py", TrainConfig)
        elif token == "-m" and following.startswith("orpo."):
            name = following.split(".")[-1].replace("_", "-")
            target, i = (f"-m {following}", config_of(name)), i + 1
        if target:
            args = []
            for t in tokens[i + 1 :]:
                if t in ("&&", "||", "|", ";"):
                    break
                args.append(t)
            found.append((*target, args))
        i += 1
    return found


def test_readme_opens_with_what_a_user_needs_first_and_stays_short():
    text = README.read_text()
    lines = text.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move reference material into docs/"
    top = [title for level, title in headings(text) if level == 2]
    assert top[: len(README_SECTIONS)] == README_SECTIONS, top
    assert "### What the demo prints" in text


def test_quick_start_is_three_commands_and_setup_fetches_the_demo_model():
    text = README.read_text()
    block = FENCE.search(text, text.index("## Quick start"))
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(2).splitlines() if line.strip()]
    assert commands == QUICK_START
    # The demo recipe reads the folder scripts/setup.sh fetches into, with the command the README names.
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    fetch = re.search(r"whisper-orpo fetch-model (\S+) (\S+);", setup)
    assert fetch, "scripts/setup.sh no longer fetches the demo model with whisper-orpo fetch-model"
    assert f"whisper-orpo fetch-model {fetch.group(1)} {fetch.group(2)}" in text
    demo = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    assert demo["base_model"] == fetch.group(2)
    default = re.search(r"TORCH_SPEC=\$\{TORCH_SPEC:-([^}]+)\}", setup).group(1)
    assert f'TORCH_SPEC="{default} --index-url' in text  # TORCH_SPEC carrying pip arguments, as the README says


def test_readme_links_every_docs_page_and_every_link_resolves():
    linked = {(README.parent / m.split("#")[0]).resolve() for m in LINK.findall(README.read_text())}
    unlinked = [rel(p) for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f"the README's table of contents lacks {unlinked}"
    problems = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or not file.is_relative_to(ROOT):
                problems.append(f"{rel(page)}: {target}: no such file in the repository")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                problems.append(f"{rel(page)}: {target}: no heading #{anchor} in {rel(file)}")
    assert not problems, "\n".join(problems)


def test_commands_overview_names_every_subcommand():
    text = README.read_text()
    missing = [name for name in COMMANDS if f"| `whisper-orpo {name}" not in text]
    assert not missing, f"the README's command overview lacks {missing}"
    unknown = []
    for page in PAGES:
        text = page.read_text()
        quoted = INLINE_CODE.findall(text) + [body for _, body in FENCE.findall(text)]
        unknown += [
            f"{rel(page)}: whisper-orpo {m}" for q in quoted for m in SUBCOMMAND.findall(q) if m not in COMMANDS
        ]
    assert not unknown, "no such subcommand:\n" + "\n".join(unknown)


def test_quoted_commands_use_real_keys_and_files():
    problems, checked = [], 0
    for page in PAGES:
        for line in shell_lines(page):
            for program, config, args in quoted_invocations(line):
                keys = {f.name for f in config_fields(config)} | {"config", "help"}
                for arg in args:
                    if arg.startswith("--") and arg[2:].split("=")[0] not in keys:
                        problems.append(f"{rel(page)}: {program} has no key {arg}: {line}")
                checked += 1
            for path in re.findall(
                r"(?<![\w./-])((?:recipes|accelerate_configs|ds_configs|examples|bench|scripts)/\S+)", line
            ):
                if not (ROOT / path).exists():
                    problems.append(f"{rel(page)}: no such file {path}: {line}")
    assert checked >= 20, f"only {checked} quoted commands found: is the parser still reading the pages?"
    assert not problems, "\n".join(problems)


def test_no_page_names_a_path_outside_the_repository():
    # tests/test_repository.py checks tracked files; this covers the pages before they are committed too.
    problems = [problem for page in PAGES for problem in outside_paths(ROOT, page)]
    assert not problems, "\n".join(problems)


def test_make_pairs_key_table_matches_its_config():
    rows = set(re.findall(r"^\| `--(\w+)` \|", (ROOT / "docs" / "data.md").read_text(), re.M))
    keys = {f.name for f in config_fields(config_of("make-pairs"))}
    assert rows == keys, f"docs/data.md's make-pairs table: missing {keys - rows}, not keys {rows - keys}"
