"""Hugging Face datasets as training or evaluation data.

``train_data``/``test_data`` (:mod:`orpo.data.dataset`) may name, instead of a manifest:

* a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``load_from_disk``;
  a DatasetDict gives the split ``train_split``/``test_split``);
* any other directory or a dataset name, passed to ``load_dataset(name, dataset_config, split=...)``
  (a folder of parquet/JSON files, a hub id where the hub is reachable).

Recipe keys map the columns: ``audio_column`` (default "audio"), ``chosen_column`` ("chosen"),
``rejected_column`` ("rejected", a string or a list of strings), ``language_column`` (default: the
"language" column when there is one). Transcript columns may hold segment lists for timestamps, as in a
manifest; a ``<chosen_column>s``/``<rejected_column>s`` column is read as in a manifest too.

The audio column is cast to ``Audio(decode=False)``, so rows give the stored bytes or path and no
ffmpeg/torchcodec decoder is ever needed: audio is decoded with soundfile, mixed to mono and
resampled to 16 kHz like manifest audio. A column of ``{"array", "sampling_rate"}`` or of paths works
too. Every row is checked up front (transcripts, language, the audio header), and errors name the
row and column: ``dataset data/prefs (split train), row 17: column 'chosen' is missing``.
Audio is read lazily, row by row, when the clip is needed.
"""

from __future__ import annotations

import glob
import io
import logging
import os
from pathlib import Path

import numpy as np

from orpo.data.audio import AudioSource, audio_duration, load_audio
from orpo.data.schema import ASR_TEXT_KEYS, PreferenceSample, language_field, parse_transcripts
from orpo.errors import ManifestError

logger = logging.getLogger(__name__)

SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")


def _open_dataset(spec: str, split: str, config_name: str | None):
    """(Dataset, label for messages, folder that relative audio paths resolve against)."""
    import datasets

    path = Path(spec)
    if path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:
            raise ManifestError(f"dataset {spec}: cannot load it with load_from_disk: {err}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ManifestError(
                    f"dataset {spec}: no split '{split}' (splits: {', '.join(loaded)}); set train_split/test_split"
                )
            return loaded[split], f"dataset {spec} (split {split})", path / split
        return loaded, f"dataset {spec}", path
    described = f"{spec}" + (f", config {config_name}" if config_name else "") + f", split {split}"
    try:
        loaded = datasets.load_dataset(spec, config_name, split=split)
    except Exception as err:
        raise ManifestError(
            f"dataset {described}: cannot load it ({type(err).__name__}: {err}). train_data/test_data take a "
            "manifest (.jsonl/.json), a directory saved with save_to_disk, or a dataset load_dataset can reach"
        ) from None
    return loaded, f"dataset {described}", path if path.is_dir() else None


AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "mp3", "opus")  # a WebDataset sample's audio member


def open_stream(spec: str, split: str, config_name: str | None):
    """A Hugging Face ``IterableDataset`` over ``spec`` read as a stream, its label for messages, and the folder
    relative audio paths resolve against: WebDataset tar shards (a glob or comma-separated list of ``.tar``
    files: each sample ``KEY.flac``/``.wav`` with ``KEY.json`` holding the manifest fields), parquet files, a
    directory saved with ``save_to_disk`` (read in shards), or a dataset name (``load_dataset(...,
    streaming=True)``). Audio columns are read as their stored bytes or paths, never decoded by ``datasets``."""
    import datasets

    files = sorted({f for part in spec.split(",") for f in glob.glob(os.path.expanduser(part.strip()))})
    path = Path(spec)
    try:
        if files and all(f.endswith(".tar") for f in files):
            return _tar_stream(files), f"WebDataset {spec}", None
        if files and all(f.endswith(".parquet") for f in files):
            stream = datasets.load_dataset("parquet", data_files={split: files}, split=split, streaming=True)
            return stream, f"parquet {spec}", Path(files[0]).parent
        if path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES):
            dataset, label, base = _open_dataset(spec, split, config_name)
            return dataset.to_iterable_dataset(num_shards=min(len(dataset), 64)), label, base
        stream = datasets.load_dataset(spec, config_name, split=split, streaming=True)
    except ManifestError:
        raise
    except Exception as err:
        raise ManifestError(
            f"{spec}: cannot read it as a stream ({type(err).__name__}: {err}). With streaming: true, train_data "
            "takes WebDataset .tar shards, parquet files (a glob or a comma-separated list), a directory saved with "
            "save_to_disk, or a dataset name load_dataset can stream"
        ) from None
    return stream, f"dataset {spec} (split {split}, streamed)", path if path.is_dir() else None


def _tar_stream(files: list[str]):
    """WebDataset shards through ``datasets``' own reader, audio members kept as bytes (``datasets`` would
    decode them with torchcodec)."""
    import datasets

    probe = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    features = datasets.Features(
        {
            name: datasets.Value("binary") if isinstance(kind, datasets.Audio) else kind
            for name, kind in probe.features.items()
        }
    )
    return datasets.load_dataset(
        "webdataset", data_files={"train": files}, split="train", streaming=True, features=features
    )


def stream_row(row: dict, audio_column: str) -> tuple[dict, str]:
    """A streamed row as a record of columns (a WebDataset sample's JSON member opened up), and its audio
    column (a WebDataset sample's audio member when ``audio_column`` is not in the row)."""
    if isinstance(row.get("json"), dict):
        row = {**row["json"], **{k: v for k, v in row.items() if k != "json"}}
    if audio_column not in row:
        audio_column = next((name for name in AUDIO_EXTENSIONS if name in row), audio_column)
    if isinstance(row.get(audio_column), bytes):
        row = {**row, audio_column: {"bytes": row[audio_column]}}
    return row, audio_column


def stream_where(label: str, row: dict, ordinal: int) -> str:
    """How a streamed row is named in messages: its shard and key when it has them, else its position."""
    if row.get("__key__"):
        return f"{row.get('__url__', label)}, sample {row['__key__']}"
    return f"{label}, row {ordinal} of this process's stream"


def stream_sample(row: dict, where: str, audio_column: str, base: Path | None, columns: dict, duration: float):
    """A streamed row's transcripts and language as a preference sample; ``duration`` as far as known (decoded, or
    infinite before its audio is read: the checks that need it run again once it is)."""
    language_key = columns["language"] or ("language" if "language" in row else None)
    language = language_field(row, where, key=language_key, kind="column") if language_key else None
    source = _audio_input(row.get(audio_column), where, audio_column, base)
    transcripts = parse_transcripts(row, where, duration, columns["chosen"], columns["rejected"], kind="column")
    path = source if isinstance(source, Path) else None
    return PreferenceSample(audio_path=path, duration=duration, language=language, source=where, **transcripts)


def stream_audio(row: dict, where: str, audio_column: str, base: Path | None) -> np.ndarray:
    """A streamed row's audio, decoded (16 kHz mono); a clip that does not decode is a ManifestError naming it."""
    return _checked(load_audio, _audio_input(row.get(audio_column), where, audio_column, base), where, audio_column)


def _resolve(path_text: str, base: Path | None) -> Path:
    path = Path(path_text)
    if path.is_absolute() or path.is_file() or base is None:
        return path
    return base / path


def _audio_input(value, where: str, column: str, base: Path | None):
    """What soundfile should read (bytes stream or path), or a decoded (array, rate) pair."""
    if isinstance(value, dict):
        if value.get("array") is not None:
            rate = value.get("sampling_rate")
            if not isinstance(rate, int) or rate <= 0:
                raise ManifestError(f"{where}: column '{column}': an audio array needs a positive 'sampling_rate'")
            return np.asarray(value["array"], dtype=np.float32), rate
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        if value.get("path"):
            return _resolve(value["path"], base)
        raise ManifestError(f"{where}: column '{column}' has neither audio bytes nor a path")
    if isinstance(value, str) and value.strip():
        return _resolve(value, base)
    raise ManifestError(
        f"{where}: column '{column}' must hold audio ({{bytes, path}}, an array with its "
        f"sampling_rate, or a path), got {type(value).__name__}"
    )


def _checked(read, source: AudioSource, where: str, column: str):
    """``read(source)`` with a decoding error named by row and column."""
    if isinstance(source, Path) and not source.is_file():
        raise ManifestError(f"{where}: column '{column}': file {source} does not exist")
    try:
        return read(source)
    except ManifestError as err:
        raise ManifestError(f"{where}: column '{column}': {err}") from None


class DatasetAudio:
    """Loads one row's audio when called (picklable: DataLoader workers get the dataset by reference)."""

    def __init__(self, dataset, row: int, column: str, where: str, base: Path | None):
        self.dataset, self.row, self.column, self.where, self.base = dataset, row, column, where, base

    def __call__(self) -> np.ndarray:
        value = self.dataset[self.row][self.column]
        return _checked(load_audio, _audio_input(value, self.where, self.column, self.base), self.where, self.column)


def read_hf_dataset(
    spec: str,
    *,
    split: str = "train",
    config_name: str | None = None,
    audio_column: str = "audio",
    chosen_column: str = "chosen",
    rejected_column: str | None = "rejected",
    language_column: str | None = None,
) -> list[PreferenceSample]:
    """Check every row of a Hugging Face dataset and return it as preference samples; ``rejected_column`` None:
    plain ASR data, its reference in a "text" (or "sentence") column, nothing rejected."""
    from datasets import Audio

    dataset, label, base = _open_dataset(spec, split, config_name)
    columns = list(dataset.column_names)
    language_key = language_column or ("language" if "language" in columns else None)
    needed = [(audio_column, "audio_column"), (chosen_column, "chosen_column"), (rejected_column, "rejected_column")]
    if rejected_column is None:
        chosen_column = next((c for c in ASR_TEXT_KEYS if c in columns), None)
        if chosen_column is None:
            raise ManifestError(
                f"{label}: no column 'text' or 'sentence' (columns: {', '.join(columns)}); plain ASR data gives "
                "each clip's reference transcript in one of them"
            )
        needed = [(audio_column, "audio_column")]
    if language_column:
        needed.append((language_column, "language_column"))
    for column, key in needed:
        alternatives = [column, column + "s"] if key in ("chosen_column", "rejected_column") else [column]
        if not any(c in columns for c in alternatives):
            raise ManifestError(
                f"{label}: no column '{column}' (columns: {', '.join(columns)}); set {key} to the column that holds it"
            )
    if isinstance(dataset.features.get(audio_column), Audio):
        dataset = dataset.cast_column(audio_column, Audio(decode=False))
    if len(dataset) == 0:
        raise ManifestError(f"{label}: the dataset has no rows")

    samples = []
    for row_index in range(len(dataset)):
        row = dataset[row_index]
        where = f"{label}, row {row_index}"
        value = row[audio_column]
        source = _audio_input(value, where, audio_column, base)
        duration = _checked(audio_duration, source, where, audio_column)
        language = language_field(row, where, key=language_key, kind="column") if language_key else None
        path = source if isinstance(source, Path) else None
        if path is None and isinstance(value, dict) and value.get("path"):
            path = Path(value["path"])  # informative only: the audio comes from the stored bytes
        samples.append(
            PreferenceSample(
                audio_path=path,
                duration=duration,
                language=language,
                source=where,
                audio_loader=DatasetAudio(dataset, row_index, audio_column, where, base),
                **parse_transcripts(row, where, duration, chosen_column, rejected_column, kind="column"),
            )
        )
    logger.info("%s: %d rows", label, len(samples))
    return samples
