"""Loading the base Whisper model and its processor (bitsandbytes 8-/4-bit when asked), and saving a tuned one."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from orpo.config import TrainConfig
from orpo.data.spelling import english_spelling_mapping
from orpo.errors import ConfigError
from orpo.files import disk_full_guard, fresh_staging_dir, publish_dir, publish_files
from orpo.scale.zero3 import param_numel

logger = logging.getLogger(__name__)


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
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return None


def load_whisper(cfg: TrainConfig, device: int | str) -> WhisperForConditionalGeneration:
    """The base model, in 8-bit or 4-bit through bitsandbytes when asked, then placed on ``device`` (a CUDA
    index; ``"cpu"`` runs bitsandbytes' CPU backend, which ``bench/gpu.py --dry-run`` uses)."""
    if cfg.load_in_8bit or cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        kwargs = {"quantization_config": quantization_config(cfg), "device_map": {"": device}}
        whisper = WhisperForConditionalGeneration.from_pretrained(cfg.base_model, **kwargs)
        whisper = prepare_model_for_kbit_training(
            whisper,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
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


def check_hardware(cfg: TrainConfig) -> None:
    """Settings this machine cannot honour stop the run before any weights load."""
    for name in ("load_in_8bit", "load_in_4bit"):
        if not getattr(cfg, name):
            continue
        if not torch.cuda.is_available():
            raise ConfigError(f"{name} needs a CUDA GPU (bitsandbytes); this machine has none. Set --{name} false.")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{name} needs the bitsandbytes package: pip install -e '.[quantization]'")
    if not torch.cuda.is_available():
        if cfg.mixed_precision == "fp16":
            raise ConfigError("mixed_precision fp16 needs a CUDA GPU; on CPU use bf16 or no.")


def write_weights(whisper, folder: Path) -> None:
    """``config.json``, ``generation_config.json`` and ``model.safetensors`` (tied weights stored once) of a plain
    model, as ``save_pretrained`` writes them but without its unwrapping, which imports DeepSpeed whenever it is
    installed (DeepSpeed then prints "Setting accelerator to ..." in runs that never use it). A quantised
    (bitsandbytes) or PEFT model keeps ``save_pretrained``: its weights need their own serialisation."""
    if getattr(whisper, "hf_quantizer", None) is not None or hasattr(whisper, "peft_config"):
        whisper.save_pretrained(folder, safe_serialization=True)
        return
    from safetensors.torch import save_file

    folder = Path(folder)
    whisper.config.dtype = str(whisper.dtype).split(".")[1]  # as save_pretrained records them
    whisper.config.architectures = [type(whisper).__name__]
    whisper.config.save_pretrained(folder)
    whisper.generation_config.save_pretrained(folder)
    # A tied weight appears under two names with one storage: the first name keeps it (the token embedding;
    # the head ties to it again on load). Each tensor is copied into its own storage, since DeepSpeed's ZeRO
    # leaves parameters as views into one flat buffer, which safetensors refuses to save as it is.
    tensors, seen = {}, set()
    for name, tensor in whisper.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_whisper(whisper, processor: WhisperProcessor, folder: Path) -> None:
    """Everything ``from_pretrained`` and the ASR pipeline need: safetensors weights with ``use_cache`` on, the
    processor, the feature extractor's ``preprocessor_config.json``, and the tokenizer's vocabulary files with
    Whisper's spelling table (``normalizer.json``), as hub checkpoints have them."""
    whisper.config.use_cache = True  # training turns the KV cache off; inference must not run without it
    write_weights(whisper, folder)
    tokenizer = processor.tokenizer
    if getattr(tokenizer, "english_spelling_normalizer", None) is None:
        tokenizer.english_spelling_normalizer = english_spelling_mapping()
    processor.save_pretrained(folder)
    processor.feature_extractor.save_pretrained(folder)
    try:
        tokenizer.save_vocabulary(str(folder))
    except (AttributeError, TypeError, OSError) as err:  # a tokenizer without the slow files: tokenizer.json suffices
        logger.warning("tokenizer vocabulary files not written (%s); tokenizer.json is", err)


def weight_bytes(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """The bytes of a model's parameters (a tied one once; only the trainable ones if asked), what saving its
    weights writes, give or take headers."""
    return sum(param_numel(p) * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_adapter(whisper, output_dir: str | Path) -> None:
    """Write only a PEFT model's adapter, ``output_dir/adapter`` (staged, then renamed into place): the trained
    part, saved without merging (which would change the model in place while it is still evaluated)."""
    output_dir = Path(output_dir)
    staging = output_dir / ".adapter.tmp"
    needed = (weight_bytes(whisper, trainable_only=True), "the adapter's weights")
    with disk_full_guard(output_dir, "the adapter", lambda: needed, remove=staging):
        fresh_staging_dir(staging)
        whisper.save_pretrained(staging)
        publish_dir(staging, output_dir / "adapter")
    logger.info("saved the adapter to %s", output_dir / "adapter")


def save_final_model(whisper, processor: WhisperProcessor, output_dir: str | Path) -> None:
    """Write the tuned model into ``output_dir`` (beside the run's logs); with PEFT, also ``adapter/``.

    With PEFT the saved model has the adapter merged in. The files are written into a staging folder and
    each is then renamed into place: every file is whole at all times. A full disk removes the staging folder.
    """
    output_dir = Path(output_dir)
    staging = output_dir / ".final-model.tmp"
    needed = (weight_bytes(whisper), "its weights; the tokenizer's files add a few MB")  # PEFT: merged + adapter/
    with disk_full_guard(output_dir, "the final model", lambda: needed, remove=staging):
        fresh_staging_dir(staging)
        if hasattr(whisper, "merge_and_unload"):
            whisper.save_pretrained(staging / "adapter")
            whisper = whisper.merge_and_unload()
        write_whisper(whisper, processor, staging)
        publish_files(staging, output_dir)
    logger.info("saved the final model to %s", output_dir)
