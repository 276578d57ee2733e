"""Export a tuned model: a merged Hugging Face Whisper (safetensors + processor) and, optionally, CTranslate2.

``python -m orpo.export --checkpoint DIR --out OUT [--ct2 int8|float16]`` where DIR is

* a final ``output_dir`` (or any Hugging Face Whisper directory): ``config.json`` + weights;
* a PEFT adapter directory (``adapter_config.json``, e.g. ``output_dir/adapter``): loaded over its
  base model (``--base_model``, else the adapter's ``base_model_name_or_path``, else the run's
  ``config.yaml``) and merged;
* a training checkpoint (``output_dir/checkpoint-STEP``): adapter files as above, or what
  ``accelerator.save_state`` wrote: ``model.safetensors`` with the state dict of the trained
  ``ORPOWhisper`` (keys ``whisper.…``: every weight, or with PEFT only the adapters' and other
  trainable ones), or under DeepSpeed the engine's ZeRO shards in ``pytorch_model/`` (consolidated
  with DeepSpeed's ``zero_to_fp32``). The weights are loaded into the base model (``--base_model``,
  else the one ``trainer_state.json`` records, else ``base_model`` of the run's ``config.yaml`` in
  the checkpoint or its parent); with PEFT the adapters are rebuilt from that ``config.yaml`` and merged.

``OUT`` then works with ``WhisperForConditionalGeneration.from_pretrained(OUT)`` and
``pipeline("automatic-speech-recognition", model=OUT)``. With ``--ct2 QUANT`` a CTranslate2 model for
faster-whisper is also written (``OUT_ct2`` by default), loaded back and run once greedily on a clip.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEMO_CLIP = ROOT / "examples" / "demo" / "audio" / "test_000.flac"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DEEPSPEED_ENGINE_DIR = "pytorch_model"  # accelerator.save_state under DeepSpeed: the engine's checkpoint (ZeRO shards)
CHECK_MAX_LENGTH = 128  # decoder tokens of the check transcription (a short clip needs far fewer)
CT2_QUANTIZATIONS = ("int8", "float16", "int8_float16", "int8_float32", "int8_bfloat16", "bfloat16", "float32")


class ExportError(ValueError):
    """A directory that cannot be turned into a model, with what to do about it."""


# ---------------------------------------------------------------------------------------------------------
# Loading whatever a run left behind


def run_config(folder: Path) -> dict:
    """``config.yaml`` (the resolved recipe) in ``folder`` or its parent, as a dict; {} when there is none."""
    import yaml

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
    if any((folder / f).is_file() for f in WEIGHT_FILES) or (folder / DEEPSPEED_ENGINE_DIR).is_dir():
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


def _trainer_state(folder: Path) -> dict:
    path = folder / "trainer_state.json"
    try:
        state = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


def _base_model_for(folder: Path, base_model: str | None, what: str) -> str:
    """--base_model, else the base the checkpoint records (trainer_state.json), else the run's config.yaml."""
    if base_model:
        return base_model
    recorded = _trainer_state(folder).get("settings", {}).get("base_model") or run_config(folder).get("base_model")
    if recorded:
        return str(recorded)
    raise ExportError(f"{folder} is {what} and holds no base model: pass --base_model (the model it was trained from)")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of an ORPOWhisper state dict (possibly DDP/compile-wrapped) as the inner model names them."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod.", "whisper."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _read_deepspeed_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Full float32 weights from a DeepSpeed (ZeRO-2/3) checkpoint's shards, via DeepSpeed's zero_to_fp32."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise ExportError(f"{folder} is a DeepSpeed checkpoint; reading it needs the deepspeed package "
                          "(pip install 'whisper-orpo[deepspeed]')") from None
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_ENGINE_DIR)
    return {k: v.float() for k, v in state.items()}


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / DEEPSPEED_ENGINE_DIR).is_dir() and not (folder / "model.safetensors").is_file():
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

    return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)


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
        from orpo.config import TrainConfig
        from orpo.pretrained import apply_peft

        settings = run_config(folder)
        if settings.get("peft", "none") == "none":
            raise ExportError(f"{folder} holds PEFT adapter weights but no config.yaml with the peft settings "
                              "beside it (in the checkpoint or its parent output_dir)")
        keys = {k: v for k, v in settings.items()
                if k in TrainConfig.__dataclass_fields__ and k.startswith(("peft", "lora_", "adalora_"))}
        total_steps = _trainer_state(folder).get("total_steps") or settings.get("max_steps") or 0
        whisper = apply_peft(whisper, TrainConfig(**keys), total_steps=max(int(total_steps), 100))
    expected = whisper.state_dict()
    try:
        missing, unexpected = whisper.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ: another model size
        raise ExportError(f"{folder}: the checkpoint does not fit base model {base}: "
                          f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None
    if peft_state:  # the frozen base weights come from the base model; every adapter weight must be there
        missing = [k for k in missing if "lora_" in k or ".ranknum" in k]
    missing = [k for k in missing if not k.endswith("proj_out.weight")]  # tied to embed_tokens
    if unexpected or missing or not state:
        raise ExportError(f"{folder}: the checkpoint does not fit base model {base} (with the run's peft settings): "
                          f"{len(missing)} missing ({sorted(missing)[:3]}), {len(unexpected)} unexpected "
                          f"({sorted(unexpected)[:3]}) of {len(expected)} weights")
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


# ---------------------------------------------------------------------------------------------------------
# Writing


def save_merged(whisper, processor, out: str | Path, overwrite: bool = False) -> Path:
    """Write a Hugging Face model (safetensors) with its processor to ``out`` (staged, then moved in place).

    The tokenizer gets Whisper's English spelling table (``normalizer.json``) when it has none, so
    ``tokenizer.normalize`` works on the exported model as it does on hub checkpoints.
    """
    from orpo.evaluate import english_spelling_mapping

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass --overwrite to replace it")
    staging = out.with_name(out.name + ".export.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    whisper.config.use_cache = True
    whisper.save_pretrained(staging, safe_serialization=True)
    tokenizer = processor.tokenizer
    if getattr(tokenizer, "english_spelling_normalizer", None) is None:
        tokenizer.english_spelling_normalizer = english_spelling_mapping()
    processor.save_pretrained(staging)
    # preprocessor_config.json (feature extractor: n_mels, ...) for faster-whisper and older transformers, and
    # vocab.json, merges.txt, normalizer.json beside tokenizer.json, as hub checkpoints have them.
    processor.feature_extractor.save_pretrained(staging)
    try:
        tokenizer.save_vocabulary(str(staging))
    except (AttributeError, TypeError, OSError) as err:  # a tokenizer without the slow files: tokenizer.json suffices
        logger.warning("tokenizer vocabulary files not written (%s); tokenizer.json is", err)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
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
    converter = TransformersConverter(str(hf_dir), copy_files=copy,
                                      load_as_float16=quantization in ("float16", "int8_float16"))
    converter.convert(str(ct2_dir), quantization=quantization, force=True)
    return ct2_dir


def decoder_prompt(tokenizer, multilingual: bool, language: str | None, task: str) -> list[str]:
    """Whisper's decoder prompt as tokens: with language and task for multilingual models, none for .en."""
    from orpo.data import language_code

    prompt = ["<|startoftranscript|>"]
    if multilingual:
        prompt += [f"<|{language_code(language or 'en')}|>", f"<|{task}|>"]
    return prompt + ["<|notimestamps|>"]


def check_audio(path: str | Path | None = None) -> np.ndarray:
    """16 kHz mono samples of ``path``, of the bundled demo clip, or (neither there) a 2 s chirp."""
    from orpo.data import load_audio

    if path is not None:
        return load_audio(Path(path))
    if DEMO_CLIP.is_file():
        return load_audio(DEMO_CLIP)
    t = np.arange(32000) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t))).astype(np.float32)


def hf_greedy(whisper, processor, audio: np.ndarray, prompt: list[str], max_length: int = 225) -> list[int]:
    """Token ids (after the prompt) of a greedy transcript by the Hugging Face model, from the given prompt."""
    from transformers import GenerationMixin

    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    prefix = torch.tensor([processor.tokenizer.convert_tokens_to_ids(prompt)])
    with torch.no_grad():
        out = GenerationMixin.generate(whisper.eval(), input_features=features.to(whisper.dtype), decoder_input_ids=prefix,
                                       num_beams=1, do_sample=False, max_length=max_length)
    ids = out[0, prefix.shape[1]:].tolist()
    eos = whisper.generation_config.eos_token_id
    return ids[:ids.index(eos)] if eos in ids else ids


def ct2_greedy(ct2_dir: str | Path, processor, audio: np.ndarray, prompt: list[str], max_length: int = 225) -> list[int]:
    """Load the CTranslate2 model and transcribe ``audio`` greedily from ``prompt``: the generated token ids."""
    import ctranslate2

    model = ctranslate2.models.Whisper(str(ct2_dir), device="cuda" if ctranslate2.get_cuda_device_count() else "cpu")
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="np").input_features
    result = model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32)),
                            [prompt], beam_size=1, max_length=max_length)
    return list(result[0].sequences_ids[0])


def compare_tokens(ct2_ids: list[int], hf_ids: list[int]) -> str:
    """'same tokens', 'same first N tokens' (a transcript cut by the length limits, which the two count
    differently) or 'tokens differ' (expected now and then after int8/float16 quantization)."""
    n = min(len(ct2_ids), len(hf_ids))
    if ct2_ids[:n] != hf_ids[:n]:
        return "tokens differ"
    return "same tokens" if len(ct2_ids) == len(hf_ids) else f"same first {n} tokens; length limits differ"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orpo.export",
        description="Write a merged Hugging Face Whisper model (safetensors + processor) from a training output, "
                    "adapter or checkpoint, and optionally a CTranslate2 model for faster-whisper.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="a final output_dir, a PEFT adapter directory or a checkpoint-STEP directory")
    parser.add_argument("--out", required=True, help="directory for the merged Hugging Face model")
    parser.add_argument("--base_model", default=None,
                        help="base model for an adapter or state-dict checkpoint (default: the run's config.yaml "
                             "or the adapter's own record)")
    parser.add_argument("--ct2", default=None, choices=CT2_QUANTIZATIONS,
                        help="also write a CTranslate2 model with this quantization (needs the ctranslate2 package)")
    parser.add_argument("--ct2_out", default=None, help="directory for the CTranslate2 model (default: OUT_ct2)")
    parser.add_argument("--language", default=None,
                        help="language of the check transcription for multilingual models (default: the run's "
                             "config.yaml, else English)")
    parser.add_argument("--check_audio", default=None,
                        help="audio file for the check transcription (default: the demo's test_000.flac)")
    parser.add_argument("--check_max_length", type=int, default=CHECK_MAX_LENGTH,
                        help="most decoder tokens of the check transcription")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT (and the CTranslate2 folder) if they exist")
    return parser


def main(argv: list[str] | None = None) -> int:
    from orpo.pretrained import is_multilingual

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    source = Path(args.checkpoint)
    try:
        whisper, processor, description = load_model(source, args.base_model)
        out = save_merged(whisper, processor, args.out, args.overwrite)
        print(f"wrote {out} (from {description})")
        if args.ct2:
            ct2_dir = Path(args.ct2_out) if args.ct2_out else out.with_name(out.name + "_ct2")
            export_ct2(out, ct2_dir, args.ct2, args.overwrite)
            settings = run_config(source)
            prompt = decoder_prompt(processor.tokenizer, is_multilingual(whisper.config),
                                    args.language or settings.get("language"), settings.get("task") or "transcribe")
            audio = check_audio(args.check_audio)
            ct2_ids = ct2_greedy(ct2_dir, processor, audio, prompt, args.check_max_length)
            hf_ids = hf_greedy(whisper, processor, audio, prompt, args.check_max_length)
            decode = processor.tokenizer.decode
            print(f"wrote {ct2_dir} (CTranslate2, {args.ct2}); it loads and transcribes the check clip:")
            print(f"  ctranslate2:  {decode(ct2_ids, skip_special_tokens=True).strip()!r}")
            print(f"  transformers: {decode(hf_ids, skip_special_tokens=True).strip()!r} ({compare_tokens(ct2_ids, hf_ids)})")
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
