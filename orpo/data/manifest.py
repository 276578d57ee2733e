"""Preference and plain ASR manifests: JSON Lines (one object per line) or a JSON array of objects::

    {"audio": {"path": "a.wav"}, "duration": 10.5, "chosen": "good", "rejected": "bad", "language": "English"}

Every record is checked before training starts; a bad one raises :class:`~orpo.errors.ManifestError`
naming the file, the line and the field. Nothing is skipped silently and no sample is ever swapped for
another. Audio paths resolve against the manifest's folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from orpo.config import DURATION_TOLERANCE
from orpo.data.audio import audio_durations
from orpo.data.schema import (
    ASR_TEXT_KEYS,
    AsrSample,
    PreferenceSample,
    language_field,
    parse_transcripts,
    text_field,
)
from orpo.errors import ManifestError

MANIFEST_SUFFIXES = (".json", ".jsonl")


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook``: a key given twice in one object is an error, not "the last one wins"."""
    record = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)


def _manifest_text(path: Path, start: int = 0, end: int | None = None, first_line: int = 1) -> str:
    """The file (or its bytes ``start:end``, which begin on line ``first_line``) as text; anything but UTF-8 is an
    error naming the line and byte where it stops being UTF-8."""
    with path.open("rb") as f:
        f.seek(start)
        data = f.read() if end is None else f.read(end - start)
    if start == 0 and data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ManifestError(f"{path}: the manifest is UTF-16; save it as UTF-8")
    try:
        return data.decode("utf-8-sig" if start == 0 else "utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        raise ManifestError(
            f"{path}:{line}: not UTF-8 (byte offset {start + err.start}, byte {data[err.start]:#04x}); save the "
            "manifest as UTF-8"
        ) from None


def _decode(text: str, pos: int, where: str) -> tuple[object, int]:
    try:
        return _DECODER.raw_decode(text, pos)
    except _DuplicateKey as err:
        raise ManifestError(f"{where}: key '{err.key}' is given twice in one record") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where}: not valid JSON ({err.msg})") from None


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _position(text: str, pos: int) -> str:
    """line:column of ``pos``, both from 1."""
    column = pos - text.rfind("\n", 0, pos)
    return f"{_line(text, pos)}:{column}"


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _array_records(path: Path, text: str) -> list[tuple[int, object]]:
    """A JSON array as strict JSON (commas between records, none after the last), and nothing after its ']'."""
    records, pos = [], _skip_space(text, text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            line = _line(text, pos)
            value, pos = _decode(text, pos, f"{path}:{line}")
            records.append((line, value))
            pos = _skip_space(text, pos)
            if pos >= len(text):
                raise ManifestError(f"{path}: the JSON array is not closed with ']'")
            if text[pos] == "]":
                pos += 1
                break
            if text[pos] != ",":
                raise ManifestError(f"{path}:{_position(text, pos)}: expected ',' or ']' after a record")
            pos = _skip_space(text, pos + 1)
            if pos >= len(text):
                raise ManifestError(f"{path}: the JSON array is not closed with ']'")
            if text[pos] == "]":
                raise ManifestError(f"{path}:{_position(text, pos)}: a comma after the last record (strict JSON)")
    pos = _skip_space(text, pos)
    if pos < len(text):
        raise ManifestError(
            f"{path}:{_position(text, pos)}: text after the end of the JSON array; a manifest is one JSON array, "
            "or one JSON object per line"
        )
    return records


def is_json_array(path: Path) -> bool:
    """Whether a manifest is one JSON array (else JSON Lines: one object per line)."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _manifest_records(path: Path, part: tuple[int, int, int] | None = None) -> list[tuple[int, object]]:
    """(line number, parsed JSON value) for each record of a JSON Lines file or a JSON array; the whole file
    is read, and anything that is not part of the records is an error with its position. ``part`` (JSON Lines
    only): (first byte, end byte, first line) of whole lines to read instead."""
    start, end, first_line = part or (0, None, 1)
    text = _manifest_text(path, start, end, first_line)
    if part is None and text.lstrip().startswith("["):
        return _array_records(path, text)
    records = []
    # split on "\n" only: str.splitlines would also break at U+2028 and friends, legal inside JSON strings
    for line, raw in enumerate(text.split("\n"), start=first_line):
        if not raw.strip():
            continue
        value, end = _decode(raw, _skip_space(raw, 0), f"{path}:{line}")
        if raw[end:].strip():
            raise ManifestError(f"{path}:{line}:{end + 1}: text after the record; each line must be one JSON object")
        records.append((line, value))
    return records


def _audio_path(record: dict, manifest: Path, where: str) -> Path:
    """The record's audio file, resolved against the manifest's folder."""
    audio = record.get("audio")
    audio_path = audio.get("path") if isinstance(audio, dict) else audio
    if not isinstance(audio_path, str) or not audio_path.strip():
        raise ManifestError(f"{where}: field 'audio.path' is missing or empty")
    full_path = Path(audio_path) if Path(audio_path).is_absolute() else manifest.parent / audio_path
    if full_path.is_dir():
        raise ManifestError(f"{where}: field 'audio.path': {full_path} is a directory, not an audio file")
    if not full_path.is_file():
        raise ManifestError(f"{where}: field 'audio.path': file {full_path} does not exist")
    return full_path


def _given_duration(record: dict, where: str) -> float | None:
    """The record's own ``duration`` (seconds), when it gives one."""
    value = record.get("duration")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ManifestError(f"{where}: field 'duration' must be a non-negative number of seconds, got {value!r}")
    return float(value)


def _decoded_durations(records: list, paths: list[Path], tolerance: float) -> list[float]:
    """Every clip decoded in full, in parallel; the first bad one in file order is the error. A clip that
    decodes shorter or longer than its record's ``duration`` by more than ``tolerance`` seconds is truncated
    (or the duration is wrong): training it would pair part of the audio with the whole transcript."""
    unique = list(dict.fromkeys(paths))  # a file several lines name is decoded once
    by_path = dict(zip(unique, audio_durations(unique, desc="check audio")))
    decoded = [by_path[path] for path in paths]
    durations = []
    for (_, where, record), duration in zip(records, decoded):
        if isinstance(duration, ManifestError):
            raise ManifestError(f"{where}: field 'audio.path': {duration}")
        given = _given_duration(record, where)
        if given is not None and abs(given - duration) > tolerance:
            raise ManifestError(
                f"{where}: field 'duration' is {given:.2f} s but the audio decodes to {duration:.2f} s "
                f"(duration_tolerance: {tolerance} s): the file is truncated or the duration is wrong; "
                "fix the file or the field, or raise duration_tolerance"
            )
        durations.append(duration)
    return durations


def _audio_records(path: Path, tolerance: float, part=None) -> list[tuple[int, str, dict, Path, float]]:
    """(line, where, record, audio file, decoded duration) of every record of a manifest (or of its ``part``)."""
    records = list(_checked_records(path, part))
    if not records and part is None:
        raise ManifestError(f"{path}: the manifest has no records")
    paths = [_audio_path(record, path, where) for _, where, record in records]
    durations = _decoded_durations(records, paths, tolerance)
    return [(*record, audio, duration) for record, audio, duration in zip(records, paths, durations)]


def _checked_records(path: Path, part=None):
    """(line, where, record) for each record of a manifest that is a JSON object."""
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    for line, record in _manifest_records(path, part):
        where = f"{path}:{line}"
        if not isinstance(record, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield line, where, record


def read_manifest(
    path: str | Path, duration_tolerance: float = DURATION_TOLERANCE, part: tuple[int, int, int] | None = None
) -> list[PreferenceSample]:
    """Parse and check every record of a manifest (or, JSON Lines only, of its ``part``: first byte, end byte and
    first line of whole lines, as :func:`line_parts` cuts them); audio paths resolve against its folder."""
    path = Path(path)
    return [
        PreferenceSample(
            audio_path=full_path,
            duration=duration,
            language=language_field(record, where),
            source=where,
            **parse_transcripts(record, where, duration),
        )
        for _, where, record, full_path, duration in _audio_records(path, duration_tolerance, part)
    ]


def line_parts(path: Path, parts: int) -> list[tuple[int, int, int]]:
    """A JSON Lines file cut into about ``parts`` runs of whole lines: (first byte, end byte, first line) each."""
    size = path.stat().st_size
    cuts, line, start = [], 1, 0
    with path.open("rb") as f:
        while start < size:
            f.seek(min(size, start + max(1, size // parts)))
            f.readline()  # to the end of the line the cut falls in
            end = min(size, f.tell())
            f.seek(start)
            lines = f.read(end - start).count(b"\n")
            cuts.append((start, end, line))
            line, start = line + lines, end
    return cuts


def read_asr_manifest(path: str | Path, duration_tolerance: float = DURATION_TOLERANCE) -> list[AsrSample]:
    """A plain ASR manifest: our manifest shape with a reference "text" (or "sentence") per clip.

    Same JSON Lines / JSON array parsing and audio checks as :func:`read_manifest`; a bad line is a
    :class:`ManifestError` naming the file, the line and the field.
    """
    samples = []
    for line, where, record, full_path, duration in _audio_records(Path(path), duration_tolerance):
        key = next((k for k in ASR_TEXT_KEYS if k in record), None)
        if key is None:
            raise ManifestError(
                f"{where}: field 'text' is missing (a plain ASR manifest gives the reference "
                "transcript as 'text' or 'sentence')"
            )
        samples.append(
            AsrSample(
                audio_path=full_path,
                duration=duration,
                text=text_field(record, key, where),
                language=language_field(record, where),
                source=where,
                line=line,
                record=record,
            )
        )
    return samples


def is_manifest(spec: str) -> bool:
    """A manifest file (JSON Lines or JSON array) rather than a Hugging Face dataset directory or name."""
    path = Path(spec)
    return path.is_file() or (path.suffix.lower() in MANIFEST_SUFFIXES and not path.is_dir())
