"""Preference manifests, audio loading, Whisper token prefixes and the packing collator.

A manifest is JSON Lines (one object per line) or a JSON array of objects::

    {"audio": {"path": "a.wav"}, "duration": 10.5, "chosen": "good", "rejected": "bad", "language": "English"}

Every line is checked before training starts; a bad line raises :class:`ManifestError` naming the
file, the line and the field. Nothing is skipped silently and no sample is ever swapped for another.

The collator packs all transcripts of a clip (chosen first, then each rejected one) into one decoder
row: segments sit side by side, each restarts its positions at 0 and attends only to itself
(block-causal). The model then runs the encoder once per clip and the decoder once per batch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
IGNORE_INDEX = -100


class ManifestError(ValueError):
    """A manifest line that cannot be trained on."""


@dataclass
class PreferenceSample:
    """One clip with its chosen transcript and one or more rejected ones."""

    audio_path: Path
    duration: float
    chosen: str
    rejected: list[str]
    language: str | None
    source: str  # "file:line", for error messages


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


def _text_field(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        raise ManifestError(f"{where}: field '{key}' is missing")
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{where}: field '{key}' must be a non-empty string, got {value!r}")
    return value.strip()


def _rejected_field(record: dict, where: str) -> list[str]:
    value = record.get("rejected")
    if isinstance(value, list):
        if not value:
            raise ManifestError(f"{where}: field 'rejected' is an empty list")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise ManifestError(f"{where}: field 'rejected[{i}]' must be a non-empty string, got {item!r}")
        return [item.strip() for item in value]
    return [_text_field(record, "rejected", where)]


def read_manifest(path: str | Path) -> list[PreferenceSample]:
    """Parse and check every record of a manifest; audio paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    samples = []
    for line, record in _manifest_records(path):
        where = f"{path}:{line}"
        if not isinstance(record, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
        audio = record.get("audio")
        audio_path = audio.get("path") if isinstance(audio, dict) else audio
        if not isinstance(audio_path, str) or not audio_path.strip():
            raise ManifestError(f"{where}: field 'audio.path' is missing or empty")
        full_path = Path(audio_path) if Path(audio_path).is_absolute() else path.parent / audio_path
        if not full_path.is_file():
            raise ManifestError(f"{where}: field 'audio.path': file {full_path} does not exist")
        try:
            info = sf.info(str(full_path))
        except Exception as err:  # soundfile raises several types for undecodable files
            raise ManifestError(f"{where}: field 'audio.path': cannot decode {full_path}: {err}") from None
        language = record.get("language")
        if language is not None and not isinstance(language, str):
            raise ManifestError(f"{where}: field 'language' must be a string, got {language!r}")
        if language is not None:
            try:
                language_code(language)
            except ValueError as err:
                raise ManifestError(f"{where}: field 'language': {err}") from None
        samples.append(PreferenceSample(
            audio_path=full_path,
            duration=float(info.frames) / info.samplerate,
            chosen=_text_field(record, "chosen", where),
            rejected=_rejected_field(record, where),
            language=language,
            source=where,
        ))
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


def load_audio(path: Path) -> np.ndarray:
    """Read a file with soundfile, mix to mono and resample to 16 kHz (float32)."""
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:
        raise ManifestError(f"cannot decode audio file {path}: {err}") from None
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return audio


class WhisperTokens:
    """Builds Whisper decoder token sequences: prefix + transcript + <|endoftext|>.

    Multilingual prefix: ``<|startoftranscript|><|lang|><|task|><|notimestamps|>``; English-only
    (.en) models were trained without language and task tokens, so theirs is
    ``<|startoftranscript|><|notimestamps|>``. Text is encoded with a leading space, as Whisper
    itself writes the first word after the prefix.
    """

    def __init__(self, tokenizer, multilingual: bool, task: str, timestamps: bool, max_length: int):
        self.tokenizer = tokenizer
        self.multilingual = multilingual
        self.task = task
        self.timestamps = timestamps
        self.max_length = max_length
        self.eot = self._special("<|endoftext|>")
        self.sot = self._special("<|startoftranscript|>")

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

    def sequence(self, language: str | None, text: str) -> tuple[list[int], int]:
        """Full token sequence and the number of prefix tokens in it."""
        prefix = self.prefix(language)
        return prefix + self.text(text) + [self.eot], len(prefix)


@dataclass
class EncodedSample:
    sample: PreferenceSample
    segments: list[tuple[list[int], int]]  # (tokens, prefix length): chosen first, then rejected


class PreferenceDataset(torch.utils.data.Dataset):
    """Clips within [min_len, max_len] seconds, tokenised up front so bad transcripts fail early."""

    def __init__(self, samples: list[PreferenceSample], feature_extractor, tokens: WhisperTokens,
                 default_language: str | None, min_len: float, max_len: float):
        self.feature_extractor = feature_extractor
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
            for field_name, text in [("chosen", sample.chosen)] + [("rejected", r) for r in sample.rejected]:
                try:
                    ids, prefix_len = tokens.sequence(language, text)
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

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        audio = load_audio(item.sample.audio_path)
        features = self.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        return {"input_features": features, "segments": item.segments, "index": index}


def pack_segments(segments: list[tuple[list[int], int]]) -> dict[str, list[int]]:
    """One decoder row for all transcripts of a clip.

    For a segment with tokens ``t_0 .. t_n`` (t_0 = <|startoftranscript|>) the decoder reads
    ``t_0 .. t_{n-1}`` and is scored on ``t_1 .. t_n``: label k lines up with logit k, no further
    shift. ``transcript`` marks the labels after the prefix (the text and <|endoftext|>).
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
