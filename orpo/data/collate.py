"""Collators: training batches with each clip's transcripts packed into one decoder row, and generation batches.

The training collator packs all transcripts of a clip (chosen first, then each rejected one) into one
decoder row: segments sit side by side, each restarts its positions at 0 and attends only to itself
(block-causal). The model then runs the encoder once per clip and the decoder once per batch.
"""

from __future__ import annotations

import numpy as np
import torch

from orpo.data.tokens import WhisperTokens

IGNORE_INDEX = -100
MODEL_INPUTS = ("input_features", "input_audio")  # log-mel features, or waveforms featurised on the device
STREAM_RECORDS = ("bad_samples", "dropped")  # what a streamed batch reports of the samples it skipped


def stacked_model_input(features: list[dict]) -> dict[str, torch.Tensor]:
    """The batch's log-mel features (or waveforms, with ``features_on_device``) stacked into one tensor."""
    name = next(key for key in MODEL_INPUTS if key in features[0])
    return {name: torch.from_numpy(np.stack([f[name] for f in features]))}


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


def decoder_rows(clips_segments: list[list[tuple[list[int], int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The padded decoder tensors of a batch: one packed row per clip (:func:`pack_segments`)."""
    rows = [pack_segments(segments) for segments in clips_segments]
    width = max(len(r["input_ids"]) for r in rows)

    def pad(key, value, dtype):
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows], dtype=dtype)

    return {
        "decoder_input_ids": pad("input_ids", pad_token_id, torch.long),
        "labels": pad("labels", IGNORE_INDEX, torch.long),
        "position_ids": pad("positions", 0, torch.long),
        "segment_ids": pad("segment_ids", -1, torch.long),
        "transcript_mask": pad("transcript", False, torch.bool),
        "num_segments": torch.tensor([len(segments) for segments in clips_segments], dtype=torch.long),
    }


class PreferenceCollator:
    """Stacks log-mel features and packs each clip's transcripts into one padded decoder row."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {
            **stacked_model_input(features),
            **decoder_rows([f["segments"] for f in features], self.pad_token_id),
            "sample_index": torch.tensor([f["index"] for f in features], dtype=torch.long),
        }
        if "source" in features[0]:  # a streamed batch: its clips' sources, and what the stream skipped on the way
            batch["sources"] = [f["source"] for f in features]
            for kind in STREAM_RECORDS:
                batch[kind] = [record for f in features for record in f.get(kind, [])]
        return batch


class GenerationCollator:
    """Log-mel features, the decoder prefix of each clip for generating text, and the clip's dataset index.

    Works on :class:`orpo.data.dataset.PreferenceDataset` items. The prefix is the clip's training prefix
    with ``<|notimestamps|>`` (a model trained with timestamps is evaluated on its text only). A batch needs
    one prefix length.
    """

    def __init__(self, dataset):
        self.tokens: WhisperTokens = dataset.tokens
        self.items = dataset.items

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        prefixes = [self.tokens.prefix(self.items[f["index"]].language, timestamps=False) for f in features]
        if len({len(p) for p in prefixes}) != 1:
            raise ValueError(f"decoder prefixes of different lengths in one batch: {prefixes}")
        return {
            **stacked_model_input(features),
            "decoder_input_ids": torch.tensor(prefixes, dtype=torch.long),
            "sample_index": torch.tensor([f["index"] for f in features], dtype=torch.long),
        }
