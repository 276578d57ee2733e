"""Export a tuned model: a merged Hugging Face Whisper (safetensors + processor) and, optionally, CTranslate2.

The merged model works with ``WhisperForConditionalGeneration.from_pretrained(OUT)`` and
``pipeline("automatic-speech-recognition", model=OUT)``. The CTranslate2 model (for faster-whisper) is
loaded back and run once greedily on a check clip, beside the Hugging Face model's own greedy tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from orpo.artifacts.run_model import load_model, run_config
from orpo.config import CT2_QUANTIZATIONS, ExportConfig
from orpo.data.audio import SAMPLE_RATE, load_audio
from orpo.data.tokens import WhisperTokens
from orpo.errors import ExportError
from orpo.eval.generate import generate, generation_config
from orpo.files import disk_full_guard, fresh_staging_dir, publish_dir
from orpo.model.load import weight_bytes, write_whisper

logger = logging.getLogger(__name__)


def save_merged(whisper, processor, out: str | Path, overwrite: bool = False) -> Path:
    """Write a Hugging Face model (safetensors) with its processor to ``out``: staged beside it, then renamed.

    The tokenizer gets Whisper's English spelling table (``normalizer.json``) when it has none, so
    ``tokenizer.normalize`` works on the exported model as it does on hub checkpoints.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass --overwrite to replace it")
    staging = out.with_name(out.name + ".export.tmp")
    needed = (weight_bytes(whisper), "its weights; the tokenizer's files add a few MB")
    with disk_full_guard(out.parent, f"the model {out.name}", lambda: needed, remove=staging):
        fresh_staging_dir(staging)
        write_whisper(whisper, processor, staging)
        publish_dir(staging, out)
    return out


def export_ct2(hf_dir: str | Path, ct2_dir: str | Path, quantization: str = "int8", overwrite: bool = False) -> Path:
    """Convert a Hugging Face Whisper directory to CTranslate2 (for faster-whisper) with ``quantization``."""
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        raise ExportError("--ct2 needs the ctranslate2 package: pip install 'whisper-orpo[export]'") from None
    if quantization not in CT2_QUANTIZATIONS:
        raise ExportError(f"unknown CTranslate2 quantization {quantization!r}; one of {', '.join(CT2_QUANTIZATIONS)}")
    hf_dir, ct2_dir = Path(hf_dir), Path(ct2_dir)
    if ct2_dir.exists() and any(ct2_dir.iterdir()) and not overwrite:
        raise ExportError(f"{ct2_dir} exists and is not empty; pass --overwrite to replace it")
    copy = [f for f in ("tokenizer.json", "preprocessor_config.json") if (hf_dir / f).is_file()]
    converter = TransformersConverter(
        str(hf_dir), copy_files=copy, load_as_float16=quantization in ("float16", "int8_float16")
    )
    converter.convert(str(ct2_dir), quantization=quantization, force=True)
    return ct2_dir


def check_audio(path: str | Path | None = None) -> np.ndarray:
    """16 kHz mono samples of ``path``, or (None) a 2 s synthetic tone: the tokens are compared either way."""
    if path is not None:
        return load_audio(Path(path))
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t))).astype(np.float32)


def hf_greedy(whisper, processor, audio: np.ndarray, prefix: list[int], max_length: int = 225) -> list[int]:
    """Token ids (after the prefix) of a greedy transcript by the Hugging Face model."""
    features = processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    whisper.eval()
    with torch.no_grad():
        out = generate(
            whisper, features, torch.tensor([prefix]), generation_config(whisper, processor.tokenizer), max_length
        )
    ids = out[0, len(prefix) :].tolist()
    eos = whisper.generation_config.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids


def ct2_greedy(
    ct2_dir: str | Path, processor, audio: np.ndarray, prefix: list[int], max_length: int = 225
) -> list[int]:
    """Load the CTranslate2 model and transcribe ``audio`` greedily from ``prefix``: the generated token ids."""
    import ctranslate2

    model = ctranslate2.models.Whisper(str(ct2_dir), device="cuda" if ctranslate2.get_cuda_device_count() else "cpu")
    features = processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    result = model.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32)),
        [processor.tokenizer.convert_ids_to_tokens(prefix)],
        beam_size=1,
        max_length=max_length,
    )
    return list(result[0].sequences_ids[0])


def compare_tokens(ct2_ids: list[int], hf_ids: list[int]) -> str:
    """'same tokens', 'same first N tokens' (a transcript cut by the length limits, which the two count
    differently) or 'tokens differ' (expected now and then after int8/float16 quantization)."""
    n = min(len(ct2_ids), len(hf_ids))
    if ct2_ids[:n] != hf_ids[:n]:
        return "tokens differ"
    return "same tokens" if len(ct2_ids) == len(hf_ids) else f"same first {n} tokens; length limits differ"


def export_from_config(cfg: ExportConfig) -> None:
    """The command: load what the run left, write the merged model, and the checked CTranslate2 one if asked."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    source = Path(cfg.checkpoint)
    whisper, processor, description = load_model(source, cfg.base_model)
    out = save_merged(whisper, processor, cfg.out, cfg.overwrite)
    print(f"wrote {out} (from {description})")
    if not cfg.ct2:
        return
    ct2_dir = Path(cfg.ct2_out) if cfg.ct2_out else out.with_name(out.name + "_ct2")
    export_ct2(out, ct2_dir, cfg.ct2, cfg.overwrite)
    settings = run_config(source)
    tokens = WhisperTokens.for_model(processor.tokenizer, whisper.config, settings.get("task") or "transcribe")
    prefix = tokens.prefix(cfg.language or settings.get("language") or "en", timestamps=False)
    audio = check_audio(cfg.check_audio)
    ct2_ids = ct2_greedy(ct2_dir, processor, audio, prefix, cfg.check_max_length)
    hf_ids = hf_greedy(whisper, processor, audio, prefix, cfg.check_max_length)
    decode = processor.tokenizer.decode
    print(f"wrote {ct2_dir} (CTranslate2, {cfg.ct2}); it loads and transcribes the check clip:")
    print(f"  ctranslate2:  {decode(ct2_ids, skip_special_tokens=True).strip()!r}")
    print(f"  transformers: {decode(hf_ids, skip_special_tokens=True).strip()!r} ({compare_tokens(ct2_ids, hf_ids)})")
