"""Loading the base Whisper model (with PEFT or 8-bit when asked) and saving the tuned one."""

from __future__ import annotations

import importlib.util
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


def quantization_config(cfg: TrainConfig):
    """bitsandbytes settings for ``load_in_8bit`` / ``load_in_4bit`` (None when neither is set).

    4-bit is QLoRA's recipe: NF4 weights, double quantisation, matrix products in the training precision.
    """
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if cfg.load_in_4bit:
        compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return None


def load_whisper(cfg: TrainConfig, device_index: int) -> WhisperForConditionalGeneration:
    """The base model, in 8-bit or 4-bit through bitsandbytes when asked (CUDA only)."""
    if cfg.load_in_8bit or cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        kwargs = {"quantization_config": quantization_config(cfg), "device_map": {"": device_index}}
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

    from orpo.distributed import param_numel, peft_model_kwargs

    common = {"lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
              "target_modules": cfg.lora_target_modules}
    if cfg.peft == "lora":
        peft_config = LoraConfig(r=cfg.lora_r, bias="none", **common)
    else:
        target_r = cfg.adalora_target_r if cfg.adalora_target_r is not None else max(1, cfg.lora_r // 4)
        tinit = cfg.adalora_tinit if cfg.adalora_tinit is not None else min(total_steps // 10, 200)
        tfinal = cfg.adalora_tfinal if cfg.adalora_tfinal is not None else min(total_steps // 5, 500)
        if target_r > cfg.lora_r:
            raise ConfigError(f"adalora_target_r ({target_r}) must not exceed lora_r ({cfg.lora_r}), "
                              "the initial rank")
        if tinit >= total_steps - tfinal:
            raise ConfigError(f"AdaLoRA needs steps to shrink ranks in: adalora_tinit ({tinit}) must be below "
                              f"the optimizer steps ({total_steps}) minus adalora_tfinal ({tfinal})")
        peft_config = AdaLoraConfig(init_r=cfg.lora_r, target_r=target_r, total_step=total_steps,
                                    tinit=tinit, tfinal=tfinal, **common)
    whisper = get_peft_model(whisper, peft_config, **peft_model_kwargs())
    trainable = sum(param_numel(p) for p in whisper.parameters() if p.requires_grad)
    total = sum(param_numel(p) for p in whisper.parameters())
    logger.info("%s adapters: %d trainable of %d parameters (%.2f%%)", cfg.peft, trainable, total,
                100 * trainable / total)
    return whisper


def adalora_orthogonal_penalty(whisper) -> torch.Tensor | None:
    """AdaLoRA's orthogonal regularisation, ``orth_reg_weight * mean ||P Pᵀ - I||_F`` over its A and B matrices.

    PEFT adds this in ``AdaLoraModel.forward`` (peft/tuners/adalora/model.py). ORPOWhisper calls the encoder and
    decoder directly and never goes through that forward, so the trainer adds it to the loss itself. None when
    the weight is 0.
    """
    adalora = whisper.base_model
    adapter = adalora.trainable_adapter_name
    weight = adalora.peft_config[adapter].orth_reg_weight
    if weight <= 0:
        return None
    terms = []
    for name, p in adalora.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            covariance = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(*covariance.shape, dtype=covariance.dtype, device=covariance.device)
            terms.append(torch.linalg.matrix_norm(covariance - eye, ord="fro"))
    if not terms:
        return None
    return weight * torch.stack(terms).mean()


class AdaLoraState:
    """AdaLoRA's rank-allocation state that lives outside the weights, for ``register_for_checkpointing``.

    The importance averages of the rank allocator and the rank pattern decide which ranks are pruned next; the
    masked singular values themselves are weights (``lora_E``) and travel with the adapter.
    """

    def __init__(self, whisper):
        self.adalora = whisper.base_model

    def _config(self):
        return self.adalora.peft_config[self.adalora.trainable_adapter_name]

    def state_dict(self) -> dict:
        allocator = self.adalora.rankallocator
        cpu = lambda d: {name: t.detach().cpu() for name, t in d.items()}  # noqa: E731
        return {"ipt": cpu(allocator.ipt), "exp_avg_ipt": cpu(allocator.exp_avg_ipt),
                "exp_avg_unc": cpu(allocator.exp_avg_unc), "rank_pattern": self._config().rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.adalora.model.named_parameters())
        allocator = self.adalora.rankallocator
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {name: t.to(params[name].device) for name, t in state[key].items()})
        self._config().rank_pattern = state["rank_pattern"]


def adalora_ranks(whisper) -> dict[str, int]:
    """Current rank of each AdaLoRA module: singular values not pruned (all of them before the first pruning)."""
    pattern = whisper.base_model.peft_config[whisper.base_model.trainable_adapter_name].rank_pattern
    if pattern:
        return {name: int(sum(bool(v) for v in mask)) for name, mask in pattern.items()}
    return {name: int(p.shape[0]) for name, p in whisper.base_model.model.named_parameters() if "lora_E" in name}


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
    for name in ("load_in_8bit", "load_in_4bit"):
        if not getattr(cfg, name):
            continue
        if not torch.cuda.is_available():
            raise ConfigError(f"{name} needs a CUDA GPU (bitsandbytes); this machine has none. "
                              f"Set --{name} false.")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{name} needs the bitsandbytes package: pip install -e '.[quantization]'")
    if cfg.report_to:
        from accelerate.tracking import get_available_trackers

        available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
        for tracker in cfg.report_to:
            if tracker not in available:
                raise ConfigError(f"report_to names {tracker}, but its package is not installed here: "
                                  f"pip install {tracker.replace('_', '-')}, or leave {tracker} out of report_to")
    if not torch.cuda.is_available():
        if cfg.mixed_precision == "fp16":
            raise ConfigError("mixed_precision fp16 needs a CUDA GPU; on CPU use bf16 or no.")
