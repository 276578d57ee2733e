"""What a training sample is: a clip with its chosen and rejected transcripts, and how records are checked.

Transcripts are plain text or lists of timed segments (``[{"start": 0.0, "end": 1.4, "text": "..."}]``, in
"chosens"/"rejecteds" or in "chosen"/"rejected" themselves). Every check raises
:class:`~orpo.errors.ManifestError` naming the record ("file:line" or "dataset ..., row N") and the field.
Manifests (:mod:`orpo.data.manifest`) and Hugging Face datasets (:mod:`orpo.data.hf`) both parse records here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from orpo.config import language_code
from orpo.errors import ManifestError

TIMESTAMP_STEP = 0.02  # seconds between Whisper timestamp tokens: <|0.00|>, <|0.02|>, ... <|30.00|>
MAX_TIMESTAMP = 30.0
# A segment may end this far past the clip's last sample (one timestamp step: times rounded up to it).
SEGMENT_END_TOLERANCE = TIMESTAMP_STEP
# Where plain ASR data (make-pairs input, regression_data) keeps its reference transcript, in order of preference.
ASR_TEXT_KEYS = ("text", "sentence")


@dataclass
class Segment:
    """A timed piece of a transcript, in seconds from the start of the clip."""

    start: float
    end: float
    text: str


@dataclass
class PreferenceSample:
    """One clip with its chosen transcript and one or more rejected ones.

    ``chosen``/``rejected`` are always plain text (segment texts joined by spaces when the manifest
    gives segments), so code that only needs text never sees segments. ``chosen_segments`` and
    ``rejected_segments`` (aligned with ``rejected``, an entry None where that transcript has none) hold
    the timed segments when the data has them. ``audio_loader``, when set, returns the clip as 16 kHz
    mono float32 (a Hugging Face dataset row); otherwise the audio is read from ``audio_path``.
    """

    audio_path: Path | None
    duration: float
    chosen: str
    rejected: list[str]
    language: str | None
    source: str  # "file:line" or "dataset DIR, row N", for error messages
    chosen_segments: list[Segment] | None = None
    rejected_segments: list[list[Segment] | None] | None = None
    audio_loader: Callable[[], np.ndarray] | None = field(default=None, repr=False)


@dataclass
class AsrSample:
    """One clip of a plain ASR manifest (a reference "text" and no preference), for ``orpo.make_pairs``."""

    audio_path: Path
    duration: float
    text: str
    language: str | None
    source: str  # "file:line"
    line: int
    record: dict  # the parsed JSON object, so that other fields can be carried over


def text_field(record: dict, key: str, where: str, kind: str = "field") -> str:
    value = record.get(key)
    if value is None:
        raise ManifestError(f"{where}: {kind} '{key}' is missing")
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{where}: {kind} '{key}' must be a non-empty string, got {value!r}")
    return value.strip()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_segments(value, name: str, where: str, duration: float, kind: str = "field") -> list[Segment]:
    """Check a list of ``{"start", "end", "text"}`` objects against the clip's duration.

    Errors name the segment and key, e.g. ``field 'chosens[2].end'``. Segments must be in order and
    must not overlap; an end may pass the clip's length by at most one timestamp step (0.02 s).
    """
    if not isinstance(value, list) or not value:
        raise ManifestError(
            f"{where}: {kind} '{name}' must be a non-empty list of segments "
            f'{{"start": s, "end": s, "text": ...}}, got {value!r}'
        )
    limit = min(duration, MAX_TIMESTAMP)
    segments: list[Segment] = []
    for i, item in enumerate(value):
        label = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise ManifestError(f"{where}: {kind} '{label}' must be an object with start, end and text, got {item!r}")
        for key in ("start", "end"):
            if item.get(key) is None:
                raise ManifestError(f"{where}: {kind} '{label}.{key}' is missing")
            if not _is_number(item[key]):
                raise ManifestError(f"{where}: {kind} '{label}.{key}' must be a number of seconds, got {item[key]!r}")
        start, end = float(item["start"]), float(item["end"])
        if start < 0:
            raise ManifestError(f"{where}: {kind} '{label}.start' is negative ({start} s)")
        if end < start:
            raise ManifestError(f"{where}: {kind} '{label}.end' ({end} s) is before its start ({start} s)")
        if end > limit + SEGMENT_END_TOLERANCE:
            what = (
                f"the clip's duration ({duration:.2f} s)"
                if duration <= MAX_TIMESTAMP
                else f"Whisper's {MAX_TIMESTAMP:.0f} s window"
            )
            raise ManifestError(f"{where}: {kind} '{label}.end' ({end} s) is beyond {what}")
        if segments and start < segments[-1].end - 1e-9:
            raise ManifestError(
                f"{where}: {kind} '{label}.start' ({start} s) is before the end of the previous segment "
                f"({segments[-1].end} s): segments must be in order and must not overlap"
            )
        text = item.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ManifestError(f"{where}: {kind} '{label}.text' must be a non-empty string, got {text!r}")
        segments.append(Segment(start, end, text.strip()))
    return segments


def _is_segment_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _joined(segments: list[Segment]) -> str:
    return " ".join(s.text for s in segments)


def _one_transcript(value, name: str, where: str, duration: float, kind: str) -> tuple[str, list[Segment] | None]:
    """A transcript given as a string, or as a list of segments: (text, segments or None)."""
    if isinstance(value, str):
        if not value.strip():
            raise ManifestError(f"{where}: {kind} '{name}' must be a non-empty string, got {value!r}")
        return value.strip(), None
    if _is_segment_list(value):
        segments = parse_segments(value, name, where, duration, kind)
        return _joined(segments), segments
    raise ManifestError(
        f"{where}: {kind} '{name}' must be a non-empty string or a list of segments "
        f'{{"start", "end", "text"}}, got {value!r}'
    )


def _several_transcripts(
    value, name: str, where: str, duration: float, kind: str
) -> list[tuple[str, list[Segment] | None]]:
    """Rejected transcripts: a string, one segment list, or a list whose items are strings or segment lists."""
    if isinstance(value, list):
        if not value:
            raise ManifestError(f"{where}: {kind} '{name}' is an empty list")
        if _is_segment_list(value):
            return [_one_transcript(value, name, where, duration, kind)]
        return [_one_transcript(item, f"{name}[{i}]", where, duration, kind) for i, item in enumerate(value)]
    return [_one_transcript(value, name, where, duration, kind)]


def parse_transcripts(
    record: dict,
    where: str,
    duration: float,
    chosen_key: str = "chosen",
    rejected_key: str | None = "rejected",
    kind: str = "field",
) -> dict:
    """The chosen and rejected transcripts of one record, as PreferenceSample fields.

    ``chosen``/``rejected`` may hold plain text or segment lists; ``chosens``/``rejecteds`` (the key
    with an "s") hold segment lists. When both are given, the plain key gives the text and the "s" key
    the segments, and they must hold the same number of transcripts. ``rejected_key`` None: plain ASR data.
    """
    chosen_segments_key = chosen_key + "s"

    plain, timed = record.get(chosen_key), record.get(chosen_segments_key)
    if plain is None and timed is None:
        raise ManifestError(f"{where}: {kind} '{chosen_key}' is missing")
    if timed is not None:
        chosen_segments = parse_segments(timed, chosen_segments_key, where, duration, kind)
        chosen = (
            _one_transcript(plain, chosen_key, where, duration, kind)[0]
            if plain is not None
            else _joined(chosen_segments)
        )
    else:
        chosen, chosen_segments = _one_transcript(plain, chosen_key, where, duration, kind)

    if rejected_key is None:  # plain ASR data (regression_data): a reference and nothing rejected
        return {"chosen": chosen, "rejected": [], "chosen_segments": chosen_segments, "rejected_segments": None}
    rejected_segments_key = rejected_key + "s"
    plain, timed = record.get(rejected_key), record.get(rejected_segments_key)
    if plain is None and timed is None:
        raise ManifestError(f"{where}: {kind} '{rejected_key}' is missing")
    rejected = _several_transcripts(plain, rejected_key, where, duration, kind) if plain is not None else None
    if timed is not None:
        if _is_segment_list(timed):
            timed_lists = [parse_segments(timed, rejected_segments_key, where, duration, kind)]
        elif isinstance(timed, list) and timed:
            timed_lists = [
                parse_segments(item, f"{rejected_segments_key}[{i}]", where, duration, kind)
                for i, item in enumerate(timed)
            ]
        else:
            raise ManifestError(
                f"{where}: {kind} '{rejected_segments_key}' must be a list of segments or a list "
                f"of such lists, got {timed!r}"
            )
        if rejected is None:
            rejected = [(_joined(segments), segments) for segments in timed_lists]
        elif len(rejected) != len(timed_lists):
            raise ManifestError(
                f"{where}: {kind} '{rejected_key}' holds {len(rejected)} transcripts but "
                f"'{rejected_segments_key}' holds {len(timed_lists)}"
            )
        else:
            rejected = [(text, segments) for (text, _), segments in zip(rejected, timed_lists)]
    rejected_segments = [segments for _, segments in rejected]
    return {
        "chosen": chosen,
        "rejected": [text for text, _ in rejected],
        "chosen_segments": chosen_segments,
        "rejected_segments": rejected_segments if any(s is not None for s in rejected_segments) else None,
    }


def language_field(record: dict, where: str, key: str = "language", kind: str = "field") -> str | None:
    language = record.get(key)
    if language is not None and not isinstance(language, str):
        raise ManifestError(f"{where}: {kind} '{key}' must be a string, got {language!r}")
    if language is not None:
        try:
            language_code(language)
        except ValueError as err:
            raise ManifestError(f"{where}: {kind} '{key}': {err}") from None
    return language
