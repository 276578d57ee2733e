"""The repository stands alone: no tracked file names a path outside it (a folder beside the clone, a
development machine's home or work directory), since a user who clones it has neither."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import ROOT

# Absolute paths of machines, not of the repository (examples may still write to /tmp or read /dev).
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|home|Users|mnt|opt|srv|shared)/[\w./-]*")
PARENT_PATH = re.compile(r"(?<![\w.])(?:\.\./)+[\w./-]+")


def tracked_text_files(root: Path) -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    files = []
    for name in names.splitlines():
        path = root / name
        if path.is_file() and b"\0" not in path.read_bytes()[:4096]:
            files.append(path)
    return files


def outside_paths(root: Path, path: Path) -> list[str]:
    """``file:line: path`` for each path in ``path`` that lies outside ``root``, from its folder or the root."""
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        found = [m.group(0) for m in MACHINE_PATH.finditer(line)]
        for match in PARENT_PATH.finditer(line):
            targets = ((path.parent / match.group(0)).resolve(), (root / match.group(0)).resolve())
            if not any(target.is_relative_to(root) for target in targets):
                found.append(match.group(0))
        problems += [f"{path.relative_to(root)}:{number}: {text}" for text in found]
    return problems


def test_no_tracked_file_names_a_path_outside_the_repository():
    problems = []
    for path in tracked_text_files(ROOT):
        if path != Path(__file__).resolve():
            problems += outside_paths(ROOT, path)
    assert not problems, "paths outside the repository:\n" + "\n".join(problems)


def test_the_check_finds_a_folder_beside_the_clone_and_a_machine_path(tmp_path):
    (tmp_path / "docs").mkdir()
    sibling, machine = "../" + "shared/convert.py", "/" + "work/shared/convert.py"
    readme = tmp_path / "README.md"
    readme.write_text(f"see docs/x.md\npython {sibling} --out /tmp/run\n")
    doc = tmp_path / "docs" / "x.md"
    doc.write_text(f"back to [the README](../README.md)\nor {machine}\n")
    assert outside_paths(tmp_path, readme) == [f"README.md:2: {sibling}"]
    assert outside_paths(tmp_path, doc) == [f"docs/x.md:2: {machine}"]
