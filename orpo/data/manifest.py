"""Preference and plain ASR manifests: JSON Lines (one object per line) or a JSON array of objects::

    {"audio": {"path": "a.wav"}, "duration": 10.5, "chosen": "good", "rejected": "bad", "language": "English"}

Every record is checked before training starts; a bad one raises :class:`~orpo.errors.ManifestError`
naming the file, the line and the field. Nothing is skipped silently and no sample is ever swapped for
another. Audio paths resolve against the manifest's folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from orpo.data.audio import audio_duration
from orpo.data.schema import AsrSample, PreferenceSample, language_field, parse_transcripts, text_field
from orpo.errors import ManifestError

MANIFEST_SUFFIXES = (".json", ".jsonl")
ASR_TEXT_KEYS = ("text", "sentence")


def _manifest_records(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed JSON value) for each record of a JSON Lines file or a JSON array."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        decoder = json.JSONDecoder()
        records, pos = [], text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise ManifestError(f"{path}: the JSON array is not closed with ']'")
            if text[pos] == "]":
                return records
            line = text.count("\n", 0, pos) + 1
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{path}:{line}: not valid JSON ({err.msg})") from None
            records.append((line, value))
    records = []
    # split on "\n" only: str.splitlines would also break at U+2028 and friends, legal inside JSON strings
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            records.append((line, json.loads(raw)))
        except json.JSONDecodeError as err:
            raise ManifestError(
                f"{path}:{line}: not valid JSON ({err.msg}); each line must be one JSON object"
            ) from None
    return records


def _audio_file(record: dict, manifest: Path, where: str) -> tuple[Path, float]:
    """The record's audio file (resolved against the manifest's folder) and its duration from the header."""
    audio = record.get("audio")
    audio_path = audio.get("path") if isinstance(audio, dict) else audio
    if not isinstance(audio_path, str) or not audio_path.strip():
        raise ManifestError(f"{where}: field 'audio.path' is missing or empty")
    full_path = Path(audio_path) if Path(audio_path).is_absolute() else manifest.parent / audio_path
    if not full_path.is_file():
        raise ManifestError(f"{where}: field 'audio.path': file {full_path} does not exist")
    try:
        return full_path, audio_duration(full_path)
    except ManifestError as err:
        raise ManifestError(f"{where}: field 'audio.path': {err}") from None


def _checked_records(path: Path):
    """(line, where, record) for each record of a manifest that is a JSON object."""
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    for line, record in _manifest_records(path):
        where = f"{path}:{line}"
        if not isinstance(record, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield line, where, record


def read_manifest(path: str | Path) -> list[PreferenceSample]:
    """Parse and check every record of a manifest; audio paths resolve against its folder."""
    path = Path(path)
    samples = []
    for _, where, record in _checked_records(path):
        full_path, duration = _audio_file(record, path, where)
        language = language_field(record, where)
        samples.append(
            PreferenceSample(
                audio_path=full_path,
                duration=duration,
                language=language,
                source=where,
                **parse_transcripts(record, where, duration),
            )
        )
    if not samples:
        raise ManifestError(f"{path}: the manifest has no records")
    return samples


def read_asr_manifest(path: str | Path) -> list[AsrSample]:
    """A plain ASR manifest: our manifest shape with a reference "text" (or "sentence") per clip.

    Same JSON Lines / JSON array parsing and audio checks as :func:`read_manifest`; a bad line is a
    :class:`ManifestError` naming the file, the line and the field.
    """
    path = Path(path)
    samples = []
    for line, where, record in _checked_records(path):
        full_path, duration = _audio_file(record, path, where)
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
    if not samples:
        raise ManifestError(f"{path}: the manifest has no records")
    return samples


def is_manifest(spec: str) -> bool:
    """A manifest file (JSON Lines or JSON array) rather than a Hugging Face dataset directory or name."""
    path = Path(spec)
    return path.is_file() or (path.suffix.lower() in MANIFEST_SUFFIXES and not path.is_dir())
