"""Every bad input a user can give, one row each in ``tests/bad_inputs.yaml``: the command must stop with the
row's exit code and an error holding the row's words; a ``train`` row must stop before any weights load (loading
them fails the row). ``evaluate`` and ``make-pairs`` read and check their manifest before the model loads, but
the checks that need the model's tokenizer (token lengths, a pair that reads the same) come after it.

A row (all keys but ``id``, ``exit`` and ``error`` optional):

- ``id``: a short name; ``item``: where the case comes from (an issue item, a probe).
- ``command``: ``train`` (default), ``evaluate`` or ``make-pairs``.
- ``files``: ``{name: kind}`` audio and other files to create in the case folder (see ``FILE_KINDS``; a kind may
  take arguments as ``kind:arg``). Default: ``{a.wav: wav, b.wav: wav}``.
- ``train`` / ``test``: the text of ``train.jsonl`` / ``test.jsonl`` (``train_name`` / ``test_name`` rename them;
  ``encoding`` writes the training manifest in another encoding). Without ``train`` a two-clip manifest is written.
- ``args``: ``--key value`` pairs merged over ``DEFAULT_ARGS`` (``null`` removes a key); ``{dir}`` in a value is
  the case folder, ``{model}`` the tiny model.
- ``exit``: the expected exit code; ``error``: words the error message must contain (case-sensitive), where
  ``{dir}`` is the case folder.

Adding a bad-input class is adding a row.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml
from conftest import write_clip
from trainer_helpers import save_short_window_whisper

TABLE = Path(__file__).with_name("bad_inputs.yaml")
ROWS = yaml.safe_load(TABLE.read_text(encoding="utf-8"))

DEFAULT_ARGS = {
    "train": {
        "base_model": "{model}",
        "train_data": "{dir}/train.jsonl",
        "output_dir": "{dir}/out",
        "max_steps": "1",
        "per_device_train_batch_size": "2",
    },
    "evaluate": {"model": "{model}", "data": "{dir}/train.jsonl"},
    "make-pairs": {"model": "{model}", "data": "{dir}/train.jsonl", "out": "{dir}/pairs.jsonl"},
}

GOOD_LINES = [
    {"audio": {"path": "a.wav"}, "duration": 1.0, "chosen": "the cat sat on the mat", "rejected": "the cat sat"},
    {"audio": {"path": "b.wav"}, "duration": 1.0, "chosen": "please write it down", "rejected": "please right it"},
]


def wav_truncated(path: Path, arg: str | None) -> None:
    """A WAV whose header promises 3 s but whose data holds only the first second."""
    write_clip(path, 3.0, seed=1)
    data = path.read_bytes()
    path.write_bytes(data[: 44 + 16000 * 2])


def flac_corrupt_frames(path: Path, arg: str | None) -> None:
    """A FLAC with an intact header and stream info, and garbage in place of its audio frames."""
    write_clip(path.with_suffix(".tmp.flac"), 2.0, seed=2)
    data = path.with_suffix(".tmp.flac").read_bytes()
    path.with_suffix(".tmp.flac").unlink()
    keep = 4 + 4 + struct.unpack(">I", b"\x00" + data[5:8])[0]  # "fLaC" + STREAMINFO block
    path.write_bytes(data[:keep] + bytes(range(256)) * ((len(data) - keep) // 256))


FILE_KINDS = {
    "wav": lambda path, arg: write_clip(path, float(arg or 1.0), seed=len(path.name)),
    "wav_truncated": wav_truncated,
    "flac_corrupt_frames": flac_corrupt_frames,
    "directory": lambda path, arg: path.mkdir(),
    "text": lambda path, arg: path.write_text(arg or "", encoding="utf-8"),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_short_window_whisper(tmp_path_factory.mktemp("tiny"))


def make_files(folder: Path, files: dict[str, str]) -> None:
    for name, spec in files.items():
        kind, _, arg = spec.partition(":")
        FILE_KINDS[kind](folder / name, arg or None)


def command_line(row: dict, folder: Path, model: Path) -> list[str]:
    command = row.get("command", "train")
    args = {**DEFAULT_ARGS[command], **(row.get("args") or {})}
    argv = [command]
    for key, value in args.items():
        if value is not None:
            argv.append(f"--{key}=" + str(value).replace("{dir}", str(folder)).replace("{model}", str(model)))
    return argv


def write_manifests(row: dict, folder: Path) -> None:
    default = "".join(json.dumps(line) + "\n" for line in GOOD_LINES)
    train = row.get("train", default)
    (folder / row.get("train_name", "train.jsonl")).write_bytes(train.encode(row.get("encoding", "utf-8")))
    if "test" in row:
        (folder / row.get("test_name", "test.jsonl")).write_text(row["test"], encoding="utf-8")


def no_weights(*args, **kwargs):
    raise AssertionError("weights were loaded: this bad input must stop the run before that")


@pytest.mark.parametrize("row", ROWS, ids=[row["id"] for row in ROWS])
def test_bad_input_stops_with_a_clear_error(row, tmp_path, model_dir, monkeypatch, capsys):
    from orpo.cli.main import main

    monkeypatch.setattr("orpo.train.loop.load_whisper", no_weights)
    make_files(tmp_path, row.get("files", {"a.wav": "wav", "b.wav": "wav"}))
    write_manifests(row, tmp_path)
    code = main(command_line(row, tmp_path, model_dir))
    err = capsys.readouterr().err
    assert code == row["exit"], err
    for words in row["error"]:
        assert words.replace("{dir}", str(tmp_path)) in err, f"{words!r} not in: {err}"


def test_table_rows_are_well_formed():
    known = {"id", "item", "command", "files", "train", "test", "train_name", "test_name", "encoding", "args"}
    ids = [row["id"] for row in ROWS]
    assert len(ids) == len(set(ids)), "row ids must be unique"
    for row in ROWS:
        assert {"exit", "error"} <= row.keys() and set(row) - {"exit", "error"} <= known, row["id"]
        assert row["error"], f"{row['id']}: name the words the error must contain"
        for spec in row.get("files", {}).values():
            assert spec.partition(":")[0] in FILE_KINDS, f"{row['id']}: unknown file kind {spec!r}"
