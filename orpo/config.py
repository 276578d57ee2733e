"""Typed training configuration: a YAML recipe, overridden by ``--key value`` on the command line.

Every key is a field of :class:`TrainConfig` with a type, a default and a help text. Problems in a
recipe or on the command line (unknown key, wrong type, value out of range) raise
:class:`ConfigError` naming the key, where it came from and the closest valid key, before any model
is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml


class ConfigError(ValueError):
    """A recipe or command-line value that cannot be used; ``key`` names the offending key when known."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _key(default, help: str, choices=None):
    """A config field with its help text (and allowed values) kept beside it."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # Model and language
    base_model: str = _key("openai/whisper-small", "Hub id or local directory of the Whisper model to tune.")
    language: Optional[str] = _key(
        None,
        "Default language, as a name ('Chinese') or code ('zh'); a sample's own 'language' field wins. "
        "Ignored by English-only (.en) models.",
    )
    task: str = _key("transcribe", "Whisper task token.", choices=("transcribe", "translate"))
    timestamps: bool = _key(
        False,
        "Train with timestamp tokens (drops <|notimestamps|> from the prefix); transcripts must then be "
        "segment lists with start and end times ('chosens'/'rejecteds').",
    )

    # Data
    train_data: Optional[str] = _key(
        None,
        "Training data: a manifest (JSON Lines or JSON array), a dataset directory saved with save_to_disk, "
        "or a dataset name for load_dataset.",
    )
    test_data: Optional[str] = _key(None, "Evaluation data, in the same forms as train_data; optional.")
    dataset_config: Optional[str] = _key(None, "Configuration (subset) name passed to load_dataset.")
    train_split: str = _key("train", "Split of a Hugging Face dataset to train on.")
    test_split: str = _key("test", "Split of a Hugging Face dataset to evaluate on.")
    audio_column: str = _key("audio", "Dataset column with the audio (Audio feature, {bytes, path}, or a path).")
    chosen_column: str = _key("chosen", "Dataset column with the chosen transcript.")
    rejected_column: str = _key("rejected", "Dataset column with the rejected transcript(s).")
    language_column: Optional[str] = _key(
        None, "Dataset column with each row's language (None: the 'language' column when there is one)."
    )
    min_audio_len: float = _key(0.5, "Drop clips shorter than this many seconds (counted in the log).")
    max_audio_len: float = _key(30.0, "Drop clips longer than this many seconds (Whisper sees at most 30 s).")
    augment_config_path: Optional[str] = _key(
        None, "JSON/YAML file describing audio augmentation of the training data (see README, Augmentation)."
    )
    num_workers: int = _key(0, "DataLoader worker processes.")

    # Objective
    alpha: float = _key(0.1, "Weight of the odds-ratio term (lambda in the ORPO paper, beta in TRL).")
    disable_prompt_loss: bool = _key(
        True,
        "Leave the prefix tokens (<|lang|><|task|><|notimestamps|>) out of the chosen NLL. "
        "The odds ratio never counts them.",
    )

    # Optimisation
    output_dir: str = _key("outputs/whisper-orpo", "Where checkpoints, logs and the final model go.")
    learning_rate: float = _key(1e-5, "Peak learning rate of AdamW.")
    lr_scheduler_type: str = _key(
        "linear",
        "Learning-rate schedule after warmup.",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
    )
    num_train_epochs: float = _key(1.0, "Epochs to train (ignored when max_steps > 0).")
    max_steps: int = _key(-1, "Optimizer steps to train; > 0 overrides num_train_epochs.")
    per_device_train_batch_size: int = _key(4, "Clips per device per micro-batch in training.")
    per_device_eval_batch_size: int = _key(8, "Clips per device per batch in evaluation.")
    gradient_accumulation_steps: int = _key(1, "Micro-batches per optimizer step.")
    warmup_steps: int = _key(0, "Optimizer steps of linear warmup.")
    max_grad_norm: float = _key(1.0, "Gradient clipping norm (0 turns clipping off).")
    weight_decay: float = _key(0.0, "AdamW weight decay.")
    adam_beta1: float = _key(0.9, "AdamW beta1.")
    adam_beta2: float = _key(0.999, "AdamW beta2.")
    adam_epsilon: float = _key(1e-8, "AdamW epsilon.")
    seed: int = _key(42, "Seed for initialisation, data order and dropout.")

    # Efficiency
    mixed_precision: str = _key("no", "Autocast precision.", choices=("no", "fp16", "bf16"))
    load_in_8bit: bool = _key(False, "Load the base model in 8-bit through bitsandbytes (CUDA only; needs peft).")
    load_in_4bit: bool = _key(False, "Load the base model in 4-bit NF4 through bitsandbytes (QLoRA; CUDA only; needs peft).")
    torch_compile: bool = _key(False, "Compile the model with torch.compile.")
    gradient_checkpointing: bool = _key(False, "Recompute each layer's activations in backward (least memory, ~1.3x time).")
    selective_recompute: bool = _key(
        False, "Recompute LayerNorm and GELU outputs in backward instead of keeping them (no matrix product "
        "is recomputed; exact).")
    freeze_encoder: bool = _key(
        False, "Do not train the encoder; it then runs without keeping activations for backward.")
    group_by_length: bool = _key(False, "Batch clips of similar transcript length together to cut decoder padding.")

    # PEFT
    peft: str = _key("none", "Parameter-efficient fine-tuning method.", choices=("none", "lora", "adalora"))
    lora_r: int = _key(32, "LoRA rank (AdaLoRA: initial rank).")
    lora_alpha: int = _key(64, "LoRA scaling alpha.")
    lora_dropout: float = _key(0.05, "Dropout on the LoRA path.")
    lora_target_modules: list[str] = _key(
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "Module names that get adapters."
    )
    adalora_target_r: Optional[int] = _key(None, "AdaLoRA: average rank per module after pruning (None: lora_r // 4, at least 1).")
    adalora_tinit: Optional[int] = _key(None, "AdaLoRA: optimizer steps before ranks start to shrink (None: a tenth of the steps, at most 200).")
    adalora_tfinal: Optional[int] = _key(None, "AdaLoRA: final optimizer steps with ranks fixed (None: a fifth of the steps, at most 500).")

    # Checkpoints and logging
    resume_from_checkpoint: Optional[str] = _key(None, "Checkpoint directory to resume from, or 'latest'.")
    logging_steps: int = _key(10, "Log metrics every N optimizer steps.")
    eval_steps: int = _key(0, "Evaluate every N optimizer steps (0: only at the end).")
    eval_before_train: bool = _key(
        False, "Evaluate the base model before training, so the log and eval_results.json show base versus tuned.")
    generation_num_beams: int = _key(1, "Beam width of the transcripts generated for eval WER/CER (1: greedy).")
    generation_max_length: int = _key(
        225, "Most decoder tokens of a generated eval transcript, prefix included (capped at the model's limit).")
    save_steps: int = _key(0, "Save a checkpoint every N optimizer steps (0: only the final model).")
    save_total_limit: int = _key(2, "Keep at most this many checkpoints (0: keep all); the newest is never deleted.")
    max_nonfinite_steps: int = _key(5, "Stop the run after this many optimizer steps in a row with a NaN/Inf loss (each is skipped).")
    report_to: list[str] = _key(["tensorboard"], "Experiment trackers for Accelerate (tensorboard, wandb, mlflow; none for no tracker).")

    def __post_init__(self) -> None:
        _check_values(self)


# Experiment trackers that Accelerate knows (report_to); a name outside this list is a ConfigError.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def _check_values(cfg: TrainConfig) -> None:
    """Range checks that a type alone cannot express."""
    positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "lora_r", "max_nonfinite_steps", "generation_num_beams", "generation_max_length")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}", key=name)
    non_negative = ("learning_rate", "warmup_steps", "max_grad_norm", "weight_decay", "alpha", "eval_steps",
                    "save_steps", "num_workers", "min_audio_len", "lora_dropout", "save_total_limit")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}", key=name)
    if cfg.max_audio_len <= cfg.min_audio_len:
        raise ConfigError(f"max_audio_len ({cfg.max_audio_len}) must be above min_audio_len ({cfg.min_audio_len})",
                          key="max_audio_len")
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        raise ConfigError("set num_train_epochs > 0 or max_steps > 0", key="num_train_epochs")
    for name in cfg.report_to:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"report_to: unknown tracker {name!r}; use some of {', '.join(TRACKERS)}, "
                              f"or none for no tracker.{hint}", key="report_to")
    if cfg.load_in_8bit and cfg.load_in_4bit:
        raise ConfigError("load_in_8bit and load_in_4bit cannot both be true", key="load_in_4bit")
    for name in ("load_in_8bit", "load_in_4bit"):
        if getattr(cfg, name) and cfg.peft == "none":
            raise ConfigError(f"{name} trains adapters on frozen quantised weights: set peft to lora or adalora",
                              key=name)
    for name, least in (("adalora_target_r", 1), ("adalora_tinit", 0), ("adalora_tfinal", 0)):
        if getattr(cfg, name) is not None and getattr(cfg, name) < least:
            raise ConfigError(f"{name} must be >= {least}, got {getattr(cfg, name)}", key=name)
    for f in config_fields():
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(cfg, f.name)!r}",
                              key=f.name)


def _base_type(tp):
    """(type, optional) for a field annotation such as ``Optional[str]`` or ``list[str]``."""
    optional = False
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    return tp, optional


_TYPE_HINTS = typing.get_type_hints(TrainConfig)
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(name: str, value, where: str):
    """Convert ``value`` (from YAML or a command-line string) to the declared type of ``name``."""
    tp, optional = _base_type(_TYPE_HINTS[name])

    def fail(expected: str):
        return ConfigError(f"{where}: key '{name}' expects {expected}, got {value!r}")

    is_none = value is None or (isinstance(value, str) and value.strip().lower() in {"none", "null", "~"})
    if is_none and typing.get_origin(tp) is list:
        return []
    if is_none and optional:
        return None
    if value is None:
        raise fail(tp.__name__ if isinstance(tp, type) else str(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise fail("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise fail("an integer") from None
        raise fail("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise fail("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads "1e-5" as a string
            except ValueError:
                raise fail("a number") from None
        raise fail("a number")
    if tp is str:
        if isinstance(value, bool):
            raise fail("a string (YAML reads yes/no/on/off/true/false as booleans: quote the value)")
        if isinstance(value, (str, int, float)):
            return str(value)
        raise fail("a string")
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise fail("a list of strings (YAML list, or comma-separated on the command line)")
    raise TypeError(f"unsupported config type for {name}: {tp}")


def _unknown_key_error(key: str, where: str) -> ConfigError:
    names = [f.name for f in config_fields()]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else " Run 'python train.py --help' for the list of keys."
    return ConfigError(f"{where}: unknown key '{key}'.{hint}")


def read_recipe(path: str | Path) -> dict:
    """Read a YAML recipe into ``{key: value}``, checking every key and type against TrainConfig."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of key: value, got {type(data).__name__}")
    lines = {}
    for key_node, _ in root.value:
        line = key_node.start_mark.line + 1
        if key_node.value in lines:
            raise ConfigError(f"{path}:{line}: key '{key_node.value}' is set twice (first on line {lines[key_node.value]})")
        lines[key_node.value] = line
    names = {f.name for f in config_fields()}
    values = {}
    for key, value in data.items():
        where = f"{path}:{lines.get(key, '?')}"
        if key not in names:
            raise _unknown_key_error(str(key), where)
        values[key] = coerce(key, value, where)
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Preference-tune Whisper with ORPO. Every recipe key can be overridden as --key value.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML recipe, e.g. recipes/demo.yaml")
    for f in config_fields():
        tp, _ = _base_type(_TYPE_HINTS[f.name])
        kind = "LIST" if typing.get_origin(tp) is list else tp.__name__.upper()
        choices = f.metadata.get("choices")
        help_text = f.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
        default = ",".join(f.default_factory()) if f.default is dataclasses.MISSING else f.default
        parser.add_argument(f"--{f.name}", metavar=kind, default=argparse.SUPPRESS,
                            help=f"{help_text} (default: {default})")
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the recipe given by --config, then --key value overrides."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        if flag.startswith("--"):
            raise _unknown_key_error(flag[2:].split("=")[0], "command line")
        raise ConfigError(f"command line: unexpected argument {flag!r}; use --key value")
    recipe = getattr(args, "config", None)
    values = read_recipe(recipe) if recipe else {}
    sources = {name: recipe for name in values}
    for name, raw in vars(args).items():
        if name != "config":
            values[name] = coerce(name, raw, "command line")
            sources[name] = "command line"
    try:
        return TrainConfig(**values)
    except ConfigError as err:
        origin = sources.get(err.key, "default") if err.key else None
        raise ConfigError(f"{origin}: {err}" if origin else str(err)) from None


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
