"""A Whisper model from whatever a run left behind: a model directory, a PEFT adapter, or a training checkpoint.

:func:`load_model` takes

* a final ``output_dir`` (or any Hugging Face Whisper directory): ``config.json`` + weights;
* a PEFT adapter directory (``adapter_config.json``, e.g. ``output_dir/adapter``): loaded over its
  base model (``base_model``, else the adapter's ``base_model_name_or_path``, else the run's
  ``config.yaml``) and merged;
* a training checkpoint (``output_dir/checkpoint-STEP``): adapter files as above, or what
  ``accelerator.save_state`` wrote: ``model.safetensors`` with the state dict of the trained
  ``ORPOWhisper`` (keys ``whisper.…``: every weight, or with PEFT only the adapters' and other
  trainable ones), or under DeepSpeed the engine's ZeRO shards in ``pytorch_model/`` (consolidated
  with DeepSpeed's ``zero_to_fp32``). The weights are loaded into the base model (``base_model``,
  else the one ``trainer_state.json`` records, else ``base_model`` of the run's ``config.yaml`` in
  the checkpoint or its parent); with PEFT the adapters are rebuilt from that ``config.yaml`` and merged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from orpo.config import TrainConfig
from orpo.errors import CheckpointError, ExportError
from orpo.model.peft import apply_peft
from orpo.scale.zero3 import DEEPSPEED_TAG
from orpo.train.checkpoint import engine_file_problems, read_trainer_state

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def run_config(folder: Path) -> dict:
    """``config.yaml`` (the resolved recipe) in ``folder`` or its parent, as a dict; {} when there is none."""
    for candidate in (folder / "config.yaml", folder.parent / "config.yaml"):
        if candidate.is_file():
            data = yaml.safe_load(candidate.read_text())
            return data if isinstance(data, dict) else {}
    return {}


def describe(folder: str | Path) -> str:
    """'model', 'adapter' or 'checkpoint': what :func:`load_model` will treat ``folder`` as."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a directory")
    if (folder / "config.json").is_file() and any((folder / f).is_file() for f in WEIGHT_FILES):
        return "model"
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if any((folder / f).is_file() for f in WEIGHT_FILES) or (folder / DEEPSPEED_TAG).is_dir():
        return "checkpoint"
    if (folder / "adapter" / "adapter_config.json").is_file():
        return "adapter"
    raise ExportError(
        f"{folder} holds no model: expected config.json with model.safetensors (a model directory), "
        "adapter_config.json (a PEFT adapter) or model.safetensors or pytorch_model/ (a training checkpoint)"
    )


def _has_processor(folder: Path) -> bool:
    """A tokenizer and a feature extractor (transformers 5 keeps it in processor_config.json) are saved here."""
    has = lambda *names: any((folder / n).is_file() for n in names)  # noqa: E731
    return has("tokenizer.json", "tokenizer_config.json") and has("preprocessor_config.json", "processor_config.json")


def _load_processor(*folders):
    from transformers import WhisperProcessor

    folders = [f for f in folders if f is not None]
    for folder in folders:
        if not Path(folder).is_dir() or _has_processor(Path(folder)):
            try:
                return WhisperProcessor.from_pretrained(str(folder))
            except OSError:
                continue
    raise ExportError(f"no Whisper processor (tokenizer + feature extractor) in any of {[str(f) for f in folders]}")


def _recorded_state(folder: Path) -> dict:
    """The checkpoint's ``trainer_state.json``, or {} when the folder has none that reads."""
    try:
        return read_trainer_state(folder)
    except CheckpointError:
        return {}


def _base_model_for(folder: Path, base_model: str | None, what: str) -> str:
    """--base_model, else the base the checkpoint records (trainer_state.json), else the run's config.yaml."""
    if base_model:
        return base_model
    recorded = _recorded_state(folder).get("settings", {}).get("base_model") or run_config(folder).get("base_model")
    if recorded:
        return str(recorded)
    raise ExportError(f"{folder} is {what} and holds no base model: pass --base_model (the model it was trained from)")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of an ORPOWhisper state dict (possibly DDP/compile-wrapped) as the inner model names them."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod.", "whisper."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _read_deepspeed_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Full float32 weights from a DeepSpeed (ZeRO-2/3) checkpoint's shards, via DeepSpeed's zero_to_fp32."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise ExportError(
            f"{folder} is a DeepSpeed checkpoint; reading it needs the deepspeed package "
            "(pip install 'whisper-orpo[deepspeed]')"
        ) from None
    problems = engine_file_problems(folder)  # DeepSpeed unpickles them with code execution: checked first
    if problems:
        raise ExportError(f"{folder} cannot be read: {'; '.join(problems)}")
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_TAG)
    return {k: v.float() for k, v in state.items()}


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / DEEPSPEED_TAG).is_dir() and not (folder / "model.safetensors").is_file():
        return _read_deepspeed_state_dict(folder)
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            state = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(_read_state_dict_file(folder / shard))
            return state
    raise ExportError(f"{folder}: no model.safetensors or pytorch_model.bin")


def _read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return (
        load_file(str(path))
        if path.suffix == ".safetensors"
        else torch.load(path, map_location="cpu", weights_only=True)
    )


def _load_checkpoint(folder: Path, base_model: str | None):
    """A state-dict checkpoint (accelerator.save_state) loaded into its base model, adapters merged.

    The checkpoint holds every weight of the trained ORPOWhisper (full fine-tuning; the tied output
    projection may be left out), or with PEFT only the adapters' (and other trainable) weights: the
    frozen rest comes from the base model, the adapters are rebuilt from the run's ``config.yaml``.
    """
    from transformers import WhisperForConditionalGeneration

    base = _base_model_for(folder, base_model, "a state-dict checkpoint")
    state = _strip_prefixes(_read_state_dict(folder))
    whisper = WhisperForConditionalGeneration.from_pretrained(base)
    peft_state = any(k.startswith("base_model.model.") for k in state)
    if peft_state:
        settings = run_config(folder)
        if settings.get("peft", "none") == "none":
            raise ExportError(
                f"{folder} holds PEFT adapter weights but no config.yaml with the peft settings "
                "beside it (in the checkpoint or its parent output_dir)"
            )
        keys = {
            k: v
            for k, v in settings.items()
            if k in TrainConfig.__dataclass_fields__ and k.startswith(("peft", "lora_", "adalora_"))
        }
        total_steps = _recorded_state(folder).get("total_steps") or settings.get("max_steps") or 0
        whisper = apply_peft(whisper, TrainConfig(**keys), total_steps=max(int(total_steps), 100))
    expected = whisper.state_dict()
    try:
        missing, unexpected = whisper.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ: another model size
        raise ExportError(
            f"{folder}: the checkpoint does not fit base model {base}: "
            f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}"
        ) from None
    if peft_state:  # the frozen base weights come from the base model; every adapter weight must be there
        missing = [k for k in missing if "lora_" in k or ".ranknum" in k]
    missing = [k for k in missing if not k.endswith("proj_out.weight")]  # tied to embed_tokens
    if unexpected or missing or not state:
        raise ExportError(
            f"{folder}: the checkpoint does not fit base model {base} (with the run's peft settings): "
            f"{len(missing)} missing ({sorted(missing)[:3]}), {len(unexpected)} unexpected "
            f"({sorted(unexpected)[:3]}) of {len(expected)} weights"
        )
    if hasattr(whisper, "merge_and_unload"):
        whisper = whisper.merge_and_unload()
    whisper.tie_weights()
    return whisper, base


def load_model(folder: str | Path, base_model: str | None = None):
    """(WhisperForConditionalGeneration with adapters merged, WhisperProcessor, description) from a run's output.

    ``folder`` is a model directory, a PEFT adapter directory or a training checkpoint (see the module doc).
    """
    from transformers import WhisperForConditionalGeneration

    folder = Path(folder)
    kind = describe(folder)
    if kind == "model":
        whisper = WhisperForConditionalGeneration.from_pretrained(str(folder))
        processor = _load_processor(folder, base_model, run_config(folder).get("base_model"))
        return whisper, processor, f"model {folder}"
    if kind == "adapter":
        from peft import PeftModel

        adapter = folder if (folder / "adapter_config.json").is_file() else folder / "adapter"
        recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = base_model or run_config(folder).get("base_model") or recorded
        if not base:
            raise ExportError(f"{adapter}: the adapter names no base model; pass --base_model")
        whisper = WhisperForConditionalGeneration.from_pretrained(str(base))
        whisper = PeftModel.from_pretrained(whisper, str(adapter)).merge_and_unload()
        processor = _load_processor(adapter, folder, base)
        return whisper, processor, f"adapter {adapter} over {base}"
    whisper, base = _load_checkpoint(folder, base_model)
    processor = _load_processor(folder, base)
    return whisper, processor, f"checkpoint {folder} over {base}"
