"""Loading the base Whisper model (with PEFT or 8-bit when asked) and saving the tuned one."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

from orpo.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


def is_multilingual(model_config: WhisperConfig) -> bool:
    """English-only (.en) checkpoints have a 51,864-token vocabulary; multilingual ones more."""
    return model_config.vocab_size >= 51865


def load_processor(base_model: str) -> WhisperProcessor:
    try:
        return WhisperProcessor.from_pretrained(base_model)
    except OSError as err:
        raise ConfigError(
            f"base_model: cannot load a Whisper processor from {base_model!r} ({err}). Give a local model "
            "directory or a hub id that this machine can reach."
        ) from None


def load_whisper(cfg: TrainConfig, device_index: int) -> WhisperForConditionalGeneration:
    """The base model, in 8-bit through bitsandbytes when ``load_in_8bit`` is set (CUDA only)."""
    kwargs = {}
    if cfg.load_in_8bit:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device_index}}
        whisper = WhisperForConditionalGeneration.from_pretrained(cfg.base_model, **kwargs)
        whisper = prepare_model_for_kbit_training(
            whisper, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        whisper = WhisperForConditionalGeneration.from_pretrained(cfg.base_model)
        if cfg.gradient_checkpointing:
            # Non-reentrant checkpointing keeps gradients flowing into encoder adapters even though the
            # encoder's first layers (convolutions) see inputs that do not require grad.
            whisper.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    whisper.config.use_cache = False
    return whisper


def apply_peft(whisper, cfg: TrainConfig, total_steps: int):
    """Wrap the model with LoRA or AdaLoRA adapters; return it unchanged for ``peft: none``."""
    if cfg.peft == "none":
        return whisper
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    common = {"lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
              "target_modules": cfg.lora_target_modules}
    if cfg.peft == "lora":
        peft_config = LoraConfig(r=cfg.lora_r, bias="none", **common)
    else:
        peft_config = AdaLoraConfig(init_r=cfg.lora_r, target_r=max(1, cfg.lora_r // 4), total_step=total_steps,
                                    tinit=min(total_steps // 10, 200), tfinal=min(total_steps // 5, 500), **common)
    whisper = get_peft_model(whisper, peft_config)
    trainable = sum(p.numel() for p in whisper.parameters() if p.requires_grad)
    total = sum(p.numel() for p in whisper.parameters())
    logger.info("%s adapters: %d trainable of %d parameters (%.2f%%)", cfg.peft, trainable, total,
                100 * trainable / total)
    return whisper


def save_final_model(whisper, processor: WhisperProcessor, output_dir: str | Path) -> None:
    """Write a Hugging Face model (safetensors) with its processor into ``output_dir``.

    With PEFT the adapter goes to ``output_dir/adapter`` and the saved model has it merged in. Files are
    written to a temporary folder first and moved into place, so an interrupted save never leaves a
    half-written model where a complete one was.
    """
    output_dir = Path(output_dir)
    staging = output_dir / ".final-model.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    if hasattr(whisper, "merge_and_unload"):
        whisper.save_pretrained(staging / "adapter")
        whisper = whisper.merge_and_unload()
    whisper.save_pretrained(staging, safe_serialization=True)
    processor.save_pretrained(staging)
    for entry in staging.iterdir():
        target = output_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
    logger.info("saved the final model to %s", output_dir)


def check_hardware(cfg: TrainConfig) -> None:
    """Settings this machine cannot honour stop the run before any weights load."""
    if not torch.cuda.is_available():
        if cfg.load_in_8bit:
            raise ConfigError("load_in_8bit needs a CUDA GPU (bitsandbytes); this machine has none. "
                              "Set --load_in_8bit false.")
        if cfg.mixed_precision == "fp16":
            raise ConfigError("mixed_precision fp16 needs a CUDA GPU; on CPU use bf16 or no.")
