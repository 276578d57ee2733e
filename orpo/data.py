"""Preference manifests, audio loading, Whisper token prefixes and the packing collator.

A manifest is JSON Lines (one object per line) or a JSON array of objects::

    {"audio": {"path": "a.wav"}, "duration": 10.5, "chosen": "good", "rejected": "bad", "language": "English"}

Every line is checked before training starts; a bad line raises :class:`ManifestError` naming the
file, the line and the field. Nothing is skipped silently and no sample is ever swapped for another.

Transcripts may also be lists of timed segments (``[{"start": 0.0, "end": 1.4, "text": "..."}]``, in
"chosens"/"rejecteds" or in "chosen"/"rejected" themselves); with ``timestamps: true`` they are
tokenised with Whisper's timestamp tokens. Training data may also come from a Hugging Face dataset
(:mod:`orpo.hf_datasets`) and be augmented on the fly (:mod:`orpo.augment`): :func:`build_dataset`
picks the reader and applies augmentation to the training split only.

The collator packs all transcripts of a clip (chosen first, then each rejected one) into one decoder
row: segments sit side by side, each restarts its positions at 0 and attends only to itself
(block-causal). The model then runs the encoder once per clip and the decoder once per batch.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
import soxr
import torch
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
IGNORE_INDEX = -100
TIMESTAMP_STEP = 0.02  # seconds between Whisper timestamp tokens: <|0.00|>, <|0.02|>, ... <|30.00|>
MAX_TIMESTAMP = 30.0
# A segment may end this far past the clip's last sample (one timestamp step: times rounded up to it).
SEGMENT_END_TOLERANCE = TIMESTAMP_STEP


class ManifestError(ValueError):
    """A manifest line that cannot be trained on."""


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


def _text_field(record: dict, key: str, where: str, kind: str = "field") -> str:
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
        raise ManifestError(f"{where}: {kind} '{name}' must be a non-empty list of segments "
                            f"{{\"start\": s, \"end\": s, \"text\": ...}}, got {value!r}")
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
            what = (f"the clip's duration ({duration:.2f} s)" if duration <= MAX_TIMESTAMP
                    else f"Whisper's {MAX_TIMESTAMP:.0f} s window")
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
    raise ManifestError(f"{where}: {kind} '{name}' must be a non-empty string or a list of segments "
                        f"{{\"start\", \"end\", \"text\"}}, got {value!r}")


def _several_transcripts(value, name: str, where: str, duration: float,
                         kind: str) -> list[tuple[str, list[Segment] | None]]:
    """Rejected transcripts: a string, one segment list, or a list whose items are strings or segment lists."""
    if isinstance(value, list):
        if not value:
            raise ManifestError(f"{where}: {kind} '{name}' is an empty list")
        if _is_segment_list(value):
            return [_one_transcript(value, name, where, duration, kind)]
        return [_one_transcript(item, f"{name}[{i}]", where, duration, kind) for i, item in enumerate(value)]
    return [_one_transcript(value, name, where, duration, kind)]


def parse_transcripts(record: dict, where: str, duration: float, chosen_key: str = "chosen",
                      rejected_key: str = "rejected", kind: str = "field") -> dict:
    """The chosen and rejected transcripts of one record, as PreferenceSample fields.

    ``chosen``/``rejected`` may hold plain text or segment lists; ``chosens``/``rejecteds`` (the key
    with an "s") hold segment lists. When both are given, the plain key gives the text and the "s" key
    the segments, and they must hold the same number of transcripts.
    """
    chosen_segments_key, rejected_segments_key = chosen_key + "s", rejected_key + "s"

    plain, timed = record.get(chosen_key), record.get(chosen_segments_key)
    if plain is None and timed is None:
        raise ManifestError(f"{where}: {kind} '{chosen_key}' is missing")
    if timed is not None:
        chosen_segments = parse_segments(timed, chosen_segments_key, where, duration, kind)
        chosen = (_one_transcript(plain, chosen_key, where, duration, kind)[0] if plain is not None
                  else _joined(chosen_segments))
    else:
        chosen, chosen_segments = _one_transcript(plain, chosen_key, where, duration, kind)

    plain, timed = record.get(rejected_key), record.get(rejected_segments_key)
    if plain is None and timed is None:
        raise ManifestError(f"{where}: {kind} '{rejected_key}' is missing")
    rejected = (_several_transcripts(plain, rejected_key, where, duration, kind) if plain is not None else None)
    if timed is not None:
        if _is_segment_list(timed):
            timed_lists = [parse_segments(timed, rejected_segments_key, where, duration, kind)]
        elif isinstance(timed, list) and timed:
            timed_lists = [parse_segments(item, f"{rejected_segments_key}[{i}]", where, duration, kind)
                           for i, item in enumerate(timed)]
        else:
            raise ManifestError(f"{where}: {kind} '{rejected_segments_key}' must be a list of segments or a list "
                                f"of such lists, got {timed!r}")
        if rejected is None:
            rejected = [(_joined(segments), segments) for segments in timed_lists]
        elif len(rejected) != len(timed_lists):
            raise ManifestError(f"{where}: {kind} '{rejected_key}' holds {len(rejected)} transcripts but "
                                f"'{rejected_segments_key}' holds {len(timed_lists)}")
        else:
            rejected = [(text, segments) for (text, _), segments in zip(rejected, timed_lists)]
    rejected_segments = [segments for _, segments in rejected]
    return {
        "chosen": chosen,
        "rejected": [text for text, _ in rejected],
        "chosen_segments": chosen_segments,
        "rejected_segments": rejected_segments if any(s is not None for s in rejected_segments) else None,
    }


def _language_field(record: dict, where: str, key: str = "language", kind: str = "field") -> str | None:
    language = record.get(key)
    if language is not None and not isinstance(language, str):
        raise ManifestError(f"{where}: {kind} '{key}' must be a string, got {language!r}")
    if language is not None:
        try:
            language_code(language)
        except ValueError as err:
            raise ManifestError(f"{where}: {kind} '{key}': {err}") from None
    return language


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
        info = sf.info(str(full_path))
    except Exception as err:  # soundfile raises several types for undecodable files
        raise ManifestError(f"{where}: field 'audio.path': cannot decode {full_path}: {err}") from None
    return full_path, float(info.frames) / info.samplerate


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
        language = _language_field(record, where)
        samples.append(PreferenceSample(
            audio_path=full_path,
            duration=duration,
            language=language,
            source=where,
            **parse_transcripts(record, where, duration),
        ))
    if not samples:
        raise ManifestError(f"{path}: the manifest has no records")
    return samples


ASR_TEXT_KEYS = ("text", "sentence")


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
            raise ManifestError(f"{where}: field 'text' is missing (a plain ASR manifest gives the reference "
                                "transcript as 'text' or 'sentence')")
        samples.append(AsrSample(audio_path=full_path, duration=duration, text=_text_field(record, key, where),
                                 language=_language_field(record, where), source=where, line=line,
                                 record=record))
    if not samples:
        raise ManifestError(f"{path}: the manifest has no records")
    return samples


def language_code(language: str) -> str:
    """'Chinese', 'chinese' or 'zh' -> 'zh'."""
    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise ValueError(f"unknown language {language!r}; use a Whisper language name or code such as 'English' or 'en'")


def to_mono_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    """(frames,) or (frames, channels) audio at ``rate`` -> mono float32 at 16 kHz."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def load_audio(path) -> np.ndarray:
    """Read a file (a path or a binary file object) with soundfile, mix to mono, resample to 16 kHz (float32)."""
    try:
        audio, rate = sf.read(path if hasattr(path, "read") else str(path), dtype="float32", always_2d=True)
    except Exception as err:
        raise ManifestError(f"cannot decode audio file {path}: {err}") from None
    return to_mono_16k(audio, rate)


def load_sample_audio(sample: PreferenceSample) -> np.ndarray:
    """A sample's clip as 16 kHz mono float32, from its dataset row or its file."""
    if sample.audio_loader is not None:
        return sample.audio_loader()
    return load_audio(sample.audio_path)


class WhisperTokens:
    """Builds Whisper decoder token sequences: prefix + transcript + <|endoftext|>.

    Multilingual prefix: ``<|startoftranscript|><|lang|><|task|><|notimestamps|>``; English-only
    (.en) models were trained without language and task tokens, so theirs is
    ``<|startoftranscript|><|notimestamps|>``. Text is encoded with a leading space, as Whisper
    itself writes the first word after the prefix.

    With ``timestamps`` the prefix has no ``<|notimestamps|>`` and a transcript given as segments is
    ``<|t0|> text <|t1|><|t2|> text <|t3|>...``: each segment's start and end as timestamp tokens
    (times rounded to the nearest 0.02 s), its text with a leading space in between.
    """

    def __init__(self, tokenizer, multilingual: bool, task: str, timestamps: bool, max_length: int):
        self.tokenizer = tokenizer
        self.multilingual = multilingual
        self.task = task
        self.timestamps = timestamps
        self.max_length = max_length
        self.eot = self._special("<|endoftext|>")
        self.sot = self._special("<|startoftranscript|>")
        self._timestamp_ids: dict[int, int] = {}

    def _special(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or self.tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ValueError(f"the tokenizer has no {token} token; is it a Whisper tokenizer?")
        return token_id

    def prefix(self, language: str | None) -> list[int]:
        ids = [self.sot]
        if self.multilingual:
            if language is None:
                raise ValueError("multilingual model: set 'language' in the recipe or in each manifest record")
            ids += [self._special(f"<|{language_code(language)}|>"), self._special(f"<|{self.task}|>")]
        if not self.timestamps:
            ids.append(self._special("<|notimestamps|>"))
        return ids

    def text(self, text: str) -> list[int]:
        return self.tokenizer(" " + text.strip(), add_special_tokens=False).input_ids

    def timestamp(self, seconds: float) -> int:
        """Id of the timestamp token nearest to ``seconds``: ``<|0.00|>``, ``<|0.02|>``, ... ``<|30.00|>``."""
        index = math.floor(seconds / TIMESTAMP_STEP + 0.5)
        if not 0 <= index <= round(MAX_TIMESTAMP / TIMESTAMP_STEP):
            raise ValueError(f"time {seconds} s is outside Whisper's timestamps (0 to {MAX_TIMESTAMP:.0f} s)")
        if index not in self._timestamp_ids:
            self._timestamp_ids[index] = self._special(f"<|{index * TIMESTAMP_STEP:.2f}|>")
        return self._timestamp_ids[index]

    def transcript(self, transcript: str | list[Segment]) -> list[int]:
        """Token ids of a transcript: plain text, or segments with their timestamp tokens."""
        if isinstance(transcript, str):
            return self.text(transcript)
        ids = []
        for segment in transcript:
            ids += [self.timestamp(segment.start), *self.text(segment.text), self.timestamp(segment.end)]
        return ids

    def sequence(self, language: str | None, transcript: str | list[Segment]) -> tuple[list[int], int]:
        """Full token sequence and the number of prefix tokens in it."""
        prefix = self.prefix(language)
        return prefix + self.transcript(transcript) + [self.eot], len(prefix)


@dataclass
class EncodedSample:
    sample: PreferenceSample
    segments: list[tuple[list[int], int]]  # (tokens, prefix length): chosen first, then rejected


class PreferenceDataset(torch.utils.data.Dataset):
    """Clips within [min_len, max_len] seconds, tokenised up front so bad transcripts fail early.

    ``augment`` (training only), when given, is called as ``augment(audio, index, epoch)`` on each clip
    before its features are computed; :meth:`set_epoch` sets the epoch it sees, so the augmentation of a
    clip depends on (seed, epoch, index) only.
    """

    def __init__(self, samples: list[PreferenceSample], feature_extractor, tokens: WhisperTokens,
                 default_language: str | None, min_len: float, max_len: float,
                 augment: Callable[[np.ndarray, int, int], np.ndarray] | None = None):
        self.feature_extractor = feature_extractor
        self.augment = augment
        self.epoch = 0
        kept = [s for s in samples if min_len <= s.duration <= max_len]
        dropped = len(samples) - len(kept)
        if dropped:
            logger.info("dropped %d of %d clips outside [%.2f, %.2f] s", dropped, len(samples), min_len, max_len)
        if not kept:
            raise ManifestError(f"no clip is within [{min_len}, {max_len}] s; check min_audio_len/max_audio_len")
        self.items = []
        for sample in kept:
            language = sample.language or default_language
            segments = []
            for field_name, transcript in self._transcripts(sample, tokens.timestamps):
                try:
                    ids, prefix_len = tokens.sequence(language, transcript)
                except ValueError as err:
                    raise ManifestError(f"{sample.source}: {err}") from None
                if len(ids) - 1 > tokens.max_length:
                    raise ManifestError(
                        f"{sample.source}: field '{field_name}' is {len(ids) - 1} tokens long; "
                        f"the model's decoder takes at most {tokens.max_length}"
                    )
                segments.append((ids, prefix_len))
            self.items.append(EncodedSample(sample, segments))
        self.dropped = dropped

    @staticmethod
    def _transcripts(sample: PreferenceSample, timestamps: bool) -> list[tuple[str, str | list[Segment]]]:
        """(field name, transcript) for the chosen and each rejected transcript; segments with timestamps."""
        several = len(sample.rejected) > 1
        rejected_segments = sample.rejected_segments or [None] * len(sample.rejected)
        named = [("chosen", sample.chosen, sample.chosen_segments)] + [
            (f"rejected[{k}]" if several else "rejected", text, segs)
            for k, (text, segs) in enumerate(zip(sample.rejected, rejected_segments))
        ]
        if not timestamps:
            return [(name, text) for name, text, _ in named]
        for name, _, segs in named:
            if segs is None:
                raise ManifestError(
                    f"{sample.source}: field '{name}' is plain text, but timestamps: true needs segments with "
                    f"start and end times: give '{name.split('[')[0]}s' (or '{name.split('[')[0]}' itself) as "
                    "[{\"start\": 0.0, \"end\": 1.4, \"text\": \"...\"}, ...]"
                )
        return [(name, segs) for name, _, segs in named]

    def set_epoch(self, epoch: int) -> None:
        """The epoch the augmentation sees (call it before each epoch's DataLoader iterator is made)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        audio = load_sample_audio(item.sample)
        if self.augment is not None:
            audio = self.augment(audio, index, self.epoch)
        features = self.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        return {"input_features": features, "segments": item.segments, "index": index}


MANIFEST_SUFFIXES = (".json", ".jsonl")


def is_manifest(spec: str) -> bool:
    """A manifest file (JSON Lines or JSON array) rather than a Hugging Face dataset directory or name."""
    path = Path(spec)
    return path.is_file() or (path.suffix.lower() in MANIFEST_SUFFIXES and not path.is_dir())


def load_samples(spec: str, cfg, split: str) -> list[PreferenceSample]:
    """Samples from a manifest, a dataset saved with ``save_to_disk`` (a directory), or a ``load_dataset`` name.

    ``cfg`` gives the dataset keys (``dataset_config``, ``audio_column``, ``chosen_column``,
    ``rejected_column``, ``language_column``); ``split`` is the split to read from a dataset.
    """
    if is_manifest(spec):
        return read_manifest(spec)
    from orpo.hf_datasets import read_hf_dataset

    return read_hf_dataset(
        spec, split=split, config_name=cfg.dataset_config, audio_column=cfg.audio_column,
        chosen_column=cfg.chosen_column, rejected_column=cfg.rejected_column, language_column=cfg.language_column,
    )


def build_dataset(cfg, which: str, feature_extractor, tokens: WhisperTokens) -> PreferenceDataset:
    """The training (``which="train"``) or evaluation (``"test"``) dataset of a recipe.

    Reads ``train_data``/``test_data`` (manifest or Hugging Face dataset, split ``train_split`` /
    ``test_split``); augmentation from ``augment_config_path`` applies to the training data only.
    """
    if which not in ("train", "test"):
        raise ValueError(f"which must be 'train' or 'test', got {which!r}")
    spec = cfg.train_data if which == "train" else cfg.test_data
    split = cfg.train_split if which == "train" else cfg.test_split
    augment = None
    if which == "train" and cfg.augment_config_path:
        from orpo.augment import Augmenter

        augment = Augmenter.from_file(cfg.augment_config_path, seed=cfg.seed, timestamps=cfg.timestamps)
    return PreferenceDataset(load_samples(spec, cfg, split), feature_extractor, tokens, cfg.language,
                             cfg.min_audio_len, cfg.max_audio_len, augment=augment)


def pack_segments(segments: list[tuple[list[int], int]]) -> dict[str, list[int]]:
    """One decoder row for all transcripts of a clip.

    For a segment with tokens ``t_0 .. t_n`` (t_0 = <|startoftranscript|>) the decoder reads
    ``t_0 .. t_{n-1}`` and is scored on ``t_1 .. t_n``: label k lines up with logit k, no further
    shift. ``transcript`` marks the labels after the prefix (the text, any timestamp tokens and
    <|endoftext|>).
    """
    row = {"input_ids": [], "labels": [], "positions": [], "segment_ids": [], "transcript": []}
    for segment_id, (ids, prefix_len) in enumerate(segments):
        n = len(ids) - 1
        row["input_ids"] += ids[:-1]
        row["labels"] += ids[1:]
        row["positions"] += list(range(n))
        row["segment_ids"] += [segment_id] * n
        row["transcript"] += [k >= prefix_len - 1 for k in range(n)]
    return row


class PreferenceCollator:
    """Stacks log-mel features and packs each clip's transcripts into one padded decoder row."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [pack_segments(f["segments"]) for f in features]
        width = max(len(r["input_ids"]) for r in rows)

        def pad(key, value, dtype):
            return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows], dtype=dtype)

        return {
            "input_features": torch.from_numpy(np.stack([f["input_features"] for f in features])),
            "decoder_input_ids": pad("input_ids", self.pad_token_id, torch.long),
            "labels": pad("labels", IGNORE_INDEX, torch.long),
            "position_ids": pad("positions", 0, torch.long),
            "segment_ids": pad("segment_ids", -1, torch.long),
            "transcript_mask": pad("transcript", False, torch.bool),
            "num_segments": torch.tensor([len(f["segments"]) for f in features], dtype=torch.long),
            "sample_index": torch.tensor([f["index"] for f in features], dtype=torch.long),
        }
