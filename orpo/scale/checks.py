"""Recipe versus launch configuration: checked before the Accelerator is built and before any weights load.

Reads only the environment ``accelerate launch`` sets and the DeepSpeed JSON. Each check below returns
its problems as messages naming both sides (the recipe key and where its value came from, the launch file
and its key); :func:`check_launch_config` raises them together as one :class:`~orpo.errors.ConfigError`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from orpo.errors import ConfigError
from orpo.scale.launch import uses_deepspeed


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def is_auto(value) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def _as_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def read_deepspeed_config(env=None) -> tuple[dict, str]:
    """(DeepSpeed config, where it came from) of a DeepSpeed launch.

    From the file named by ``deepspeed_config_file`` (``ACCELERATE_DEEPSPEED_CONFIG_FILE``), else the
    config Accelerate builds from ``accelerate launch`` flags (``--zero_stage`` and friends).
    """
    env = os.environ if env is None else env
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path and path != "none":
        file = Path(path)
        if not file.is_file():
            raise ConfigError(
                f"DeepSpeed config {path} (deepspeed_config_file of the accelerate config) does not "
                f"exist; paths are relative to the folder you launch from ({Path.cwd()})"
            )
        try:
            config = json.loads(file.read_text())
        except ValueError as err:
            raise ConfigError(f"DeepSpeed config {path}: not valid JSON: {err}") from None
        if not isinstance(config, dict) or not isinstance(config.get("zero_optimization"), dict):
            raise ConfigError(f"DeepSpeed config {path}: needs a 'zero_optimization' section with its 'stage'")
        return config, f"DeepSpeed config {path}"
    config = {"zero_optimization": {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))}}
    for key, name in (
        ("gradient_accumulation_steps", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"),
        ("gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING"),
    ):
        if env.get(name, "auto") != "auto":
            config[key] = float(env[name]) if key == "gradient_clipping" else int(env[name])
    offload = {
        "offload_optimizer": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
        "offload_param": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    }
    for key, name in offload.items():
        if env.get(name, "none") != "none":
            config["zero_optimization"][key] = {"device": env[name]}
    if env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "").lower() == "true":
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return config, "accelerate launch's DeepSpeed flags (--zero_stage, ...)"


def check_precision(cfg, env) -> list[str]:
    launch_precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launch_precision in ("no", cfg.mixed_precision):
        return []
    return [
        f"{cfg.origin('mixed_precision')}: mixed_precision is {cfg.mixed_precision!r}, but the accelerate launch "
        f"configuration (mixed_precision in the accelerate config file or --mixed_precision) says "
        f"{launch_precision!r}. The recipe sets the precision: leave the launch configuration at 'no', or "
        "make them agree."
    ]


def _disagree(cfg, recipe_key: str, ds_key: str, ds_value, where: str, hint: str = "") -> str:
    return (
        f"{cfg.origin(recipe_key)}: {recipe_key} is {getattr(cfg, recipe_key)!r}, but {where}: {ds_key} is "
        f"{ds_value!r}. "
        + (
            hint
            or f'Set {ds_key} to "auto" in the DeepSpeed config (the trainer fills it '
            "from the recipe), or make the two agree."
        )
    )


def check_sections(ds: dict, where: str) -> list[str]:
    """The trainer builds AdamW and steps its schedule itself: DeepSpeed must not bring its own."""
    return [
        f"{where}: has a '{section}' section. The trainer builds AdamW from the recipe (learning_rate, "
        "weight_decay, adam_beta1/2, adam_epsilon) and steps the learning-rate schedule itself "
        f"(lr_scheduler_type, warmup_steps), once per optimizer step: remove the '{section}' section."
        for section in ("optimizer", "scheduler")
        if section in ds
    ]


def check_dtypes(cfg, ds: dict, where: str) -> list[str]:
    problems = []
    for dtype in ("fp16", "bf16"):
        enabled = _lookup(ds, f"{dtype}.enabled")
        if enabled is None or is_auto(enabled):
            continue
        enabled = _as_bool(enabled)
        if enabled is None:
            problems.append(f'{where}: {dtype}.enabled must be true, false or "auto"')
        elif enabled != (cfg.mixed_precision == dtype):
            problems.append(
                _disagree(
                    cfg,
                    "mixed_precision",
                    f"{dtype}.enabled",
                    enabled,
                    where,
                    f'Set {dtype}.enabled to "auto" in the DeepSpeed config (the recipe\'s '
                    "mixed_precision fills it), or make the two agree.",
                )
            )
    return problems


def check_batch_numbers(cfg, ds: dict, where: str, world: int) -> list[str]:
    problems = []
    numeric = (
        ("per_device_train_batch_size", "train_micro_batch_size_per_gpu"),
        ("gradient_accumulation_steps", "gradient_accumulation_steps"),
        ("max_grad_norm", "gradient_clipping"),
    )
    for recipe_key, ds_key in numeric:
        value = ds.get(ds_key)
        if value is None or is_auto(value):
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            problems.append(f'{where}: {ds_key} must be a number or "auto", got {value!r}')
        elif not math.isclose(float(value), float(getattr(cfg, recipe_key)), rel_tol=1e-9, abs_tol=0.0):
            problems.append(_disagree(cfg, recipe_key, ds_key, value, where))
    total = ds.get("train_batch_size")
    if total is not None and not is_auto(total):
        expected = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
        if total != expected:
            problems.append(
                f"{cfg.origin('per_device_train_batch_size')}: per_device_train_batch_size "
                f"{cfg.per_device_train_batch_size} x gradient_accumulation_steps {cfg.gradient_accumulation_steps} "
                f"x {world} processes = {expected} clips per optimizer step, but {where}: train_batch_size is "
                f'{total!r}. Set train_batch_size to "auto".'
            )
    return problems


def check_zero3(cfg, zero: dict, where: str) -> list[str]:
    problems = []
    for key in ("load_in_8bit", "load_in_4bit"):
        if getattr(cfg, key):
            problems.append(
                f"{cfg.origin(key)}: {key} is true, but {where}: zero_optimization.stage is 3. bitsandbytes "
                "quantised weights cannot be partitioned by ZeRO-3 (4-bit would need bnb_4bit_quant_storage "
                "equal to the compute dtype, which this trainer does not set up). Use ZeRO-2 "
                "(accelerate_configs/deepspeed_zero2.yaml) or DDP with 8-bit/4-bit LoRA, or drop the "
                "quantisation under ZeRO-3."
            )
    if not _as_bool(zero.get("stage3_gather_16bit_weights_on_model_save", False)):
        problems.append(
            f"{where}: zero_optimization.stage3_gather_16bit_weights_on_model_save must be true under ZeRO-3: "
            f"the trainer gathers the full 16-bit weights to save one Hugging Face model in output_dir "
            f"({cfg.origin('output_dir')})."
        )
    return problems


def check_adalora(cfg, where: str, stage: int) -> list[str]:
    if cfg.peft != "adalora":
        return []
    return [
        f"{cfg.origin('peft')}: peft is 'adalora', but {where} runs DeepSpeed (ZeRO stage {stage}). AdaLoRA "
        "reallocates ranks from the gradients of its matrices after each optimizer step, and DeepSpeed "
        "steps and clears those gradients inside backward (and ZeRO partitions them). Use peft: lora, "
        "or AdaLoRA under DDP (accelerate_configs/multi_gpu.yaml)."
    ]


def check_grad_share(cfg, where: str) -> list[str]:
    if not cfg.log_grad_share:
        return []
    return [
        f"{cfg.origin('log_grad_share')}: log_grad_share is true, but {where} runs DeepSpeed. The probe takes the "
        "gradients of the NLL and of the odds-ratio term apart with torch.autograd.grad, which DeepSpeed's "
        "partitioned parameters and gradient hooks do not support. Measure it under DDP or on one process."
    ]


def launch_problems(cfg, env=None) -> list[str]:
    """Every contradiction between the recipe and the launch configuration, as messages (empty: none)."""
    env = os.environ if env is None else env
    problems = check_precision(cfg, env)
    if not uses_deepspeed(env):
        return problems
    ds, where = read_deepspeed_config(env)
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0)) if not is_auto(zero.get("stage", 0)) else 0
    problems += check_sections(ds, where)
    problems += check_dtypes(cfg, ds, where)
    problems += check_batch_numbers(cfg, ds, where, world=int(env.get("WORLD_SIZE", "1")))
    if stage == 3:
        problems += check_zero3(cfg, zero, where)
    return problems + check_adalora(cfg, where, stage) + check_grad_share(cfg, where)


def check_launch_config(cfg, env=None) -> None:
    """Stop the run with a ConfigError when the recipe and the launch configuration contradict each other."""
    problems = launch_problems(cfg, env)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(
            "the recipe and the launch configuration disagree:\n" + "\n".join(f"  - {p}" for p in problems)
        )
