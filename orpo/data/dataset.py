"""The training and evaluation datasets: checked samples, tokenised up front, read and featurised per item.

:func:`build_dataset` reads a recipe's ``train_data`` / ``test_data`` (a manifest or a Hugging Face
dataset) and applies augmentation to the training split only.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from orpo.config import DURATION_TOLERANCE, language_code
from orpo.data.audio import SAMPLE_RATE, load_sample_audio
from orpo.data.augment import Augmenter
from orpo.data.hf import read_hf_dataset
from orpo.data.manifest import is_manifest, read_asr_manifest, read_manifest
from orpo.data.normalize import TextNormalizer
from orpo.data.schema import PreferenceSample, Segment
from orpo.data.tokens import WhisperTokens
from orpo.errors import ConfigError, ManifestError

logger = logging.getLogger(__name__)


@dataclass
class EncodedSample:
    sample: PreferenceSample
    segments: list[tuple[list[int], int]]  # (tokens, prefix length): chosen first, then rejected
    language: str | None  # the language of its prefix: its own, else the default (multilingual models only)

    @property
    def language_code(self) -> str:
        """The clip's language code for scoring ('en' when neither the clip nor the model names one)."""
        return language_code(self.language) if self.language else "en"


def check_pair_differs(sample: PreferenceSample, normalizer: TextNormalizer, language: str | None) -> None:
    """A rejected transcript that reads as the chosen one (exactly, or after the evaluation normaliser) carries no
    preference: an error naming the line, never trained on silently."""
    chosen = normalizer(sample.chosen, language)
    for k, rejected in enumerate(sample.rejected):
        if normalizer(rejected, language) == chosen:
            name = f"rejected[{k}]" if len(sample.rejected) > 1 else "rejected"
            raise ManifestError(
                f"{sample.source}: field '{name}' reads the same as 'chosen' after Whisper's text normaliser "
                f"({chosen!r}): the pair carries no preference; give a rejected transcript that differs, or drop it"
            )


class PreferenceDataset(torch.utils.data.Dataset):
    """Clips within [min_len, max_len] seconds, tokenised up front so bad transcripts fail early.

    ``augment`` (training only), when given, is called as ``augment(audio, index, epoch)`` on each clip
    before its features are computed; :meth:`set_epoch` sets the epoch it sees, so the augmentation of a
    clip depends on (seed, epoch, index) only.
    """

    def __init__(
        self,
        samples: list[PreferenceSample],
        feature_extractor,
        tokens: WhisperTokens,
        default_language: str | None,
        min_len: float,
        max_len: float,
        augment: Callable[[np.ndarray, int, int], np.ndarray] | None = None,
    ):
        self.feature_extractor = feature_extractor
        self.tokens = tokens
        self.augment = augment
        self.epoch = 0
        kept = [s for s in samples if min_len <= s.duration <= max_len]
        self.dropped = [s.source for s in samples if not min_len <= s.duration <= max_len]  # "file:line" each
        if self.dropped:
            logger.info(
                "dropped %d of %d clips outside [%.2f, %.2f] s: %s",
                len(self.dropped),
                len(samples),
                min_len,
                max_len,
                ", ".join(self.dropped),
            )
        if not kept:
            raise ManifestError(f"no clip is within [{min_len}, {max_len}] s; check min_audio_len/max_audio_len")
        self.default_language = default_language
        self.normalizer = TextNormalizer()
        self.items = [self.encode(sample) for sample in kept]

    def encode(self, sample: PreferenceSample) -> EncodedSample:
        """A checked sample tokenised: its pairs must differ, and every transcript fit the decoder."""
        tokens = self.tokens
        language = sample.language or (self.default_language if tokens.multilingual else None)
        check_pair_differs(sample, self.normalizer, language)
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
        return EncodedSample(sample, segments, language)

    def replace_rejected(self, index: int, rejected: list[str]) -> None:
        """Clip ``index`` with other (plain-text) rejected transcripts, checked and tokenised as a manifest's are."""
        sample = replace(self.items[index].sample, rejected=list(rejected), rejected_segments=None)
        self.items[index] = self.encode(sample)

    def without_augmentation(self) -> "PreferenceDataset":
        """The same clips and pairs (the same item list: a later change shows in both) with the clean audio."""
        view = copy.copy(self)
        view.augment = None
        return view

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
                    '[{"start": 0.0, "end": 1.4, "text": "..."}, ...]'
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


def build_dataset(cfg, which: str, feature_extractor, tokens: WhisperTokens) -> PreferenceDataset:
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
    samples = load_samples(
        spec, split, **{key: getattr(cfg, key) for key in DATASET_KEYS}, duration_tolerance=cfg.duration_tolerance
    )
    return PreferenceDataset(
        samples, feature_extractor, tokens, cfg.language, cfg.min_audio_len, cfg.max_audio_len, augment=augment
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


def build_datasets(cfg, processor, model_config) -> tuple[PreferenceDataset, PreferenceDataset | None, WhisperTokens]:
    """The recipe's training and (when ``test_data`` is set) evaluation datasets, read and checked in full,
    and the token builder they were tokenised with."""
    tokens = WhisperTokens.for_model(processor.tokenizer, model_config, cfg.task, cfg.timestamps)
    train_set = build_dataset(cfg, "train", processor.feature_extractor, tokens)
    test_set = build_dataset(cfg, "test", processor.feature_extractor, tokens) if cfg.test_data else None
    return train_set, test_set, tokens
