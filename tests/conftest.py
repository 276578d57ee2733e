"""Shared fixtures: tiny random Whisper models with the real tokenizer, and small spoken-like manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models are dominated by thread overhead: one thread per process is several times faster, and the
# multi-process tests' children inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FIXTURE = ROOT / "tests" / "fixtures" / "whisper_tokenizer"

SENTENCES = [
    ("the cat sat on the mat", "the cat sat on the map"),
    ("please write it down", "please right it down"),
    ("we meet at two o'clock", "we meet at to o'clock"),
    ("their house is near the river", "there house is near the river"),
    ("she sells sea shells", "she sells see shells"),
    ("the weather is fine today", "the whether is fine today"),
    ("turn left at the next light", "turn left at the next lite"),
    ("a quick brown fox jumps", "a quick brown fox jump"),
]


def tiny_whisper_config(vocab_size: int = 51865, **overrides):
    from transformers import WhisperConfig

    english_only = vocab_size < 51865
    settings = dict(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=448,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=50256 if english_only else 50257,
        bos_token_id=50256 if english_only else 50257,
        eos_token_id=50256 if english_only else 50257,
        decoder_start_token_id=50257 if english_only else 50258,
    )
    settings.update(overrides)
    return WhisperConfig(**settings)


def save_tiny_whisper(path: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised multilingual tiny Whisper with the real tokenizer, saved like a hub model."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(tiny_whisper_config(**overrides))
    model.save_pretrained(path)
    WhisperProcessor.from_pretrained(TOKENIZER_FIXTURE).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))


@pytest.fixture(scope="session")
def processor():
    from transformers import WhisperProcessor

    return WhisperProcessor.from_pretrained(TOKENIZER_FIXTURE)


def write_clip(path: Path, seconds: float, seed: int, sample_rate: int = 16000, channels: int = 1) -> Path:
    """A short noisy chirp: cheap stand-in speech whose content differs from clip to clip."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t * (1 + t))
    audio = (tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
    if channels > 1:
        audio = np.stack([audio] * channels, axis=1)
    sf.write(str(path), audio, sample_rate)
    return path


def write_manifest(
    folder: Path, count: int = 8, name: str = "train.jsonl", language: str | None = "English", seconds: float = 1.0
) -> Path:
    """``count`` clips with chosen/rejected pairs from SENTENCES, as JSON Lines with relative paths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "audio").mkdir(exist_ok=True)
    lines = []
    for i in range(count):
        clip = write_clip(folder / "audio" / f"{name}-{i}.wav", seconds, seed=i)
        chosen, rejected = SENTENCES[i % len(SENTENCES)]
        record = {"audio": {"path": f"audio/{clip.name}"}, "duration": seconds, "chosen": chosen, "rejected": rejected}
        if language is not None:
            record["language"] = language
        lines.append(json.dumps(record))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


# Real Whisper weights, through the project's own fetch command, into a cache shared by test runs.
REAL_MODEL_CACHE = Path(os.environ.get("WHISPER_ORPO_CACHE", Path.home() / ".cache" / "whisper-orpo"))


def unavailable(reason: str):
    """Something a test needs is missing: a failure in CI (``CI=true``), a skip elsewhere; the reason printed."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    print(reason)
    pytest.skip(reason)


def real_whisper(name: str) -> Path:
    """``whisper-orpo fetch-model NAME`` into the cache (see :func:`unavailable` when it cannot be fetched)."""
    from orpo.errors import UserError
    from orpo.model.fetch import fetch_model

    try:
        return fetch_model(name, REAL_MODEL_CACHE / f"whisper-{name}")
    except UserError as err:
        unavailable(f"real Whisper {name} could not be fetched: {err}")


@pytest.fixture(scope="session")
def tiny_en_dir() -> Path:
    """Real Whisper tiny.en (English only) in Hugging Face format."""
    return real_whisper("tiny.en")


@pytest.fixture(scope="session")
def base_dir() -> Path:
    """Real multilingual Whisper base in Hugging Face format."""
    return real_whisper("base")
