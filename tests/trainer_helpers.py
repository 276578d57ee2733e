"""Helpers for the trainer's tests (checkpoints, preemption, non-finite losses, PEFT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import save_tiny_whisper, write_manifest

# Clips of the test manifests are 1 s long: a 2 s input window (100 encoder positions instead of Whisper's
# 1500) makes every training step several times cheaper and changes nothing the trainer does.
CHUNK_SECONDS = 2


def save_short_window_whisper(path: Path, seed: int = 0, **overrides) -> Path:
    """``conftest.save_tiny_whisper`` with a 2 s input window (feature extractor and encoder positions)."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    save_tiny_whisper(path, seed=seed, max_source_positions=CHUNK_SECONDS * 50, **overrides)
    tokenizer = WhisperProcessor.from_pretrained(path).tokenizer
    WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(chunk_length=CHUNK_SECONDS), tokenizer=tokenizer
    ).save_pretrained(path)
    return path


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A short-window tiny Whisper, shared by the tests of one module."""
    return save_short_window_whisper(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Four 1 s clips with chosen/rejected pairs, shared by the tests of one module."""
    return write_manifest(tmp_path_factory.mktemp("data"), count=4)
