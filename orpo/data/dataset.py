"""The training and evaluation datasets: checked samples, tokenised up front, read and featurised per item.

:func:`build_dataset` reads a recipe's ``train_data`` / ``test_data`` (a manifest or a Hugging Face
dataset) and applies augmentation to the training split only.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from orpo.config import DURATION_TOLERANCE
from orpo.data.audio import SAMPLE_RATE, load_sample_audio
from orpo.data.augment import Augmenter
from orpo.data.encode import EncodedSample, encode_sample
from orpo.data.hf import read_hf_dataset
from orpo.data.index import ClipIndex, load_index
from orpo.data.manifest import is_manifest, read_asr_manifest, read_manifest
from orpo.data.normalize import TextNormalizer
from orpo.data.schema import PreferenceSample
from orpo.data.tokens import WhisperTokens
from orpo.errors import ConfigError, ManifestError

logger = logging.getLogger(__name__)


class PreferenceDataset(torch.utils.data.Dataset):
    """Clips within [min_len, max_len] seconds, tokenised up front so bad transcripts fail early.

    ``augment`` (training only), when given, is called as ``augment(audio, index, epoch)`` on each clip
    before its features are computed; :meth:`set_epoch` sets the epoch it sees, so the augmentation of a
    clip depends on (seed, epoch, index) only. With ``raw_audio`` an item holds the (augmented) waveform padded
    to Whisper's 30 s window (``input_audio``) instead of its log-mel features: the model computes them on its
    device (``features_on_device``, :class:`orpo.model.log_mel.LogMel`).
    """

    def __init__(
        self,
        samples: list[PreferenceSample] | ClipIndex,
        feature_extractor,
        tokens: WhisperTokens,
        default_language: str | None,
        min_len: float,
        max_len: float,
        augment: Callable[[np.ndarray, int, int], np.ndarray] | None = None,
        raw_audio: bool = False,
    ):
        self.feature_extractor = feature_extractor
        self.tokens = tokens
        self.augment = augment
        self.raw_audio = raw_audio
        self.epoch = 0
        self.default_language = default_language
        self.normalizer = TextNormalizer()
        if isinstance(samples, ClipIndex):  # checked and tokenised already: arrays, no object per clip
            durations = np.asarray(samples.arrays["duration"])
            inside = (durations >= np.float32(min_len)) & (durations <= np.float32(max_len))
            self.dropped = [samples.source(i) for i in np.flatnonzero(~inside)]
            self.items = IndexedItems(samples, np.flatnonzero(inside), default_language, tokens.multilingual)
        else:
            self.dropped = [s.source for s in samples if not min_len <= s.duration <= max_len]  # "file:line" each
            self.items = [self.encode(s) for s in samples if min_len <= s.duration <= max_len]
        if self.dropped:
            logger.info(
                "dropped %d of %d clips outside [%.2f, %.2f] s: %s",
                len(self.dropped),
                len(self.dropped) + len(self.items),
                min_len,
                max_len,
                ", ".join(self.dropped),
            )
        if not len(self.items):
            raise ManifestError(f"no clip is within [{min_len}, {max_len}] s; check min_audio_len/max_audio_len")
        self.manifest_rejected = (
            [list(item.sample.rejected) for item in self.items] if isinstance(self.items, list) else None
        )

    def encode(self, sample: PreferenceSample) -> EncodedSample:
        """A checked sample tokenised: its pairs must differ, and every transcript fit the decoder."""
        return encode_sample(sample, self.tokens, self.default_language, self.normalizer)

    def packed_lengths(self) -> list[int]:
        """Decoder row length of each clip: all its transcripts packed side by side."""
        if isinstance(self.items, IndexedItems):
            return self.items.packed_lengths()
        return [sum(len(ids) - 1 for ids, _ in item.segments) for item in self.items]

    def chosen_texts(self) -> list[str]:
        return (
            self.items.chosen_texts() if isinstance(self.items, IndexedItems) else [i.sample.chosen for i in self.items]
        )

    def original_rejected(self, index: int) -> list[str]:
        """Clip ``index``'s rejected transcripts as the data gave them (before any refresh)."""
        if isinstance(self.items, IndexedItems):
            return self.items.original(index).rejected
        return list(self.manifest_rejected[index])

    def replace_rejected(self, index: int, rejected: list[str]) -> None:
        """Clip ``index`` with other (plain-text) rejected transcripts, checked and tokenised as a manifest's are."""
        sample = replace(self.items[index].sample, rejected=list(rejected), rejected_segments=None)
        self.items[index] = self.encode(sample)

    def without_augmentation(self) -> "PreferenceDataset":
        """The same clips and pairs (the same item list: a later change shows in both) with the clean audio."""
        view = copy.copy(self)
        view.augment = None
        return view

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
        return {**model_input(audio, self.feature_extractor, self.raw_audio), "segments": item.segments, "index": index}


def model_input(audio: np.ndarray, feature_extractor, raw_audio: bool) -> dict[str, np.ndarray]:
    """What the model reads of a clip: its log-mel features, or (``raw_audio``) its waveform padded to the window."""
    if raw_audio:
        window = feature_extractor.n_samples
        return {"input_audio": np.pad(audio[:window].astype(np.float32), (0, max(0, window - len(audio))))}
    features = feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
    return {"input_features": features}


class IndexedItems:
    """The clips of a :class:`~orpo.data.index.ClipIndex` that a dataset keeps, as a list of
    :class:`~orpo.data.encode.EncodedSample` made on access; a clip given other pairs (a refresh) is kept as an
    object from then on."""

    def __init__(self, index: ClipIndex, kept: np.ndarray, default_language: str | None, multilingual: bool):
        self.index = index
        self.kept = kept
        self.default_language = default_language
        self.multilingual = multilingual
        self.changed: dict[int, EncodedSample] = {}

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, i: int) -> EncodedSample:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        if i in self.changed:
            return self.changed[i]
        return self.index.encoded(int(self.kept[i]), self.default_language, self.multilingual)

    def __setitem__(self, i: int, item: EncodedSample) -> None:
        self.changed[i] = item

    def original(self, i: int) -> PreferenceSample:
        return self.index.sample(int(self.kept[i]))

    def packed_lengths(self) -> list[int]:
        lengths = self.index.packed_lengths()[self.kept].tolist()
        for i, item in self.changed.items():
            lengths[i] = sum(len(ids) - 1 for ids, _ in item.segments)
        return lengths

    def chosen_texts(self) -> list[str]:
        arrays = self.index.arrays
        offsets, blob, first = arrays["text_offsets"], arrays["text_bytes"], arrays["first_transcript"]
        texts = [bytes(blob[offsets[first[i]] : offsets[first[i] + 1]]).decode("utf-8") for i in self.kept]
        return texts


def load_samples(
    spec: str,
    split: str,
    dataset_config: str | None = None,
    audio_column: str = "audio",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    language_column: str | None = None,
    duration_tolerance: float = DURATION_TOLERANCE,
) -> list[PreferenceSample]:
    """Samples from a manifest, a dataset saved with ``save_to_disk`` (a directory), or a ``load_dataset`` name.

    The keyword arguments are the recipe's dataset keys; ``split`` is the split to read from a dataset;
    ``duration_tolerance`` applies to a manifest's ``duration`` fields.
    """
    if is_manifest(spec):
        return read_manifest(spec, duration_tolerance)
    return read_hf_dataset(
        spec,
        split=split,
        config_name=dataset_config,
        audio_column=audio_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
        language_column=language_column,
    )


DATASET_KEYS = ("dataset_config", "audio_column", "chosen_column", "rejected_column", "language_column")


def index_loader(cfg, tokens: WhisperTokens, build: bool = True) -> Callable[[str], ClipIndex]:
    """The manifest index of a recipe's data (:func:`orpo.data.index.load_index` with its keys): ``build`` False in
    the processes that load what the main process checked."""

    def load(spec: str) -> ClipIndex:
        return load_index(
            spec, tokens, cfg.language, cfg.duration_tolerance, cfg.index_cache_dir, num_proc(cfg), build=build
        )

    return load


def num_proc(cfg) -> int:
    """Processes that check a large manifest: ``num_proc``, else one per CPU core (at most 8)."""
    return cfg.num_proc or min(8, os.cpu_count() or 1)


def build_dataset(
    cfg, which: str, feature_extractor, tokens: WhisperTokens, index_for: Callable[[str], ClipIndex] | None = None
) -> PreferenceDataset:
    """The training (``which="train"``) or evaluation (``"test"``) dataset of a recipe.

    Reads ``train_data``/``test_data`` (manifest or Hugging Face dataset, split ``train_split`` /
    ``test_split``); augmentation from ``augment_config_path`` applies to the training data only.
    """
    if which not in ("train", "test"):
        raise ValueError(f"which must be 'train' or 'test', got {which!r}")
    spec = cfg.train_data if which == "train" else cfg.test_data
    if not spec:
        raise ConfigError(
            f"{cfg.origin(which + '_data')}: {which}_data is not set: give a manifest or dataset in the recipe "
            f"or with --{which}_data",
            key=f"{which}_data",
        )
    split = cfg.train_split if which == "train" else cfg.test_split
    augment = None
    if which == "train" and cfg.augment_config_path:
        augment = Augmenter.from_file(cfg.augment_config_path, seed=cfg.seed, timestamps=cfg.timestamps)
    if is_manifest(spec):  # checked once, kept as arrays (orpo.data.index)
        samples = (index_for or index_loader(cfg, tokens))(spec)
    else:
        samples = load_samples(spec, split, **{key: getattr(cfg, key) for key in DATASET_KEYS})
    return PreferenceDataset(
        samples,
        feature_extractor,
        tokens,
        cfg.language,
        cfg.min_audio_len,
        cfg.max_audio_len,
        augment=augment,
        raw_audio=which == "train" and bool(cfg.features_on_device),
    )


def load_regression_samples(cfg) -> list[PreferenceSample]:
    """``regression_data`` as samples with nothing rejected: a plain ASR manifest, or a dataset's "text"
    ("sentence") column; the audio and language columns as for the other datasets."""
    spec = cfg.regression_data
    if is_manifest(spec):
        return [
            PreferenceSample(s.audio_path, s.duration, s.text, [], s.language, s.source)
            for s in read_asr_manifest(spec, cfg.duration_tolerance)
        ]
    return read_hf_dataset(
        spec,
        split=cfg.regression_split,
        config_name=cfg.dataset_config,
        audio_column=cfg.audio_column,
        rejected_column=None,
        language_column=cfg.language_column,
    )


def build_regression_dataset(cfg, feature_extractor, tokens: WhisperTokens) -> PreferenceDataset:
    """The forgetting guard's clips (``regression_data``), checked and tokenised like the test set; always
    without timestamps (their references are plain text, and evaluations score text only)."""
    plain_tokens = WhisperTokens(tokens.tokenizer, tokens.multilingual, tokens.task, False, tokens.max_length)
    return PreferenceDataset(
        load_regression_samples(cfg),
        feature_extractor,
        plain_tokens,
        cfg.language,
        cfg.min_audio_len,
        cfg.max_audio_len,
    )


def build_datasets(
    cfg, processor, model_config, build_index: bool = True
) -> tuple[PreferenceDataset | None, PreferenceDataset | None, WhisperTokens]:
    """The recipe's training (None with ``streaming``) and (when ``test_data`` is set) evaluation datasets, read
    and checked in full, and the token builder they were tokenised with. ``build_index`` False: manifests were
    checked by another process, whose cached index is read (:func:`index_loader`)."""
    tokens = WhisperTokens.for_model(processor.tokenizer, model_config, cfg.task, cfg.timestamps)
    index_for = index_loader(cfg, tokens, build=build_index)
    # a streamed training set is read while training (orpo.data.stream), not here
    train_set = None if cfg.streaming else build_dataset(cfg, "train", processor.feature_extractor, tokens, index_for)
    test_set = build_dataset(cfg, "test", processor.feature_extractor, tokens, index_for) if cfg.test_data else None
    return train_set, test_set, tokens
