"""Scaling out: DeepSpeed ZeRO-2/3 (with CPU offload), multi-GPU and multi-node launches.

The trainer stays one hand-written Accelerate loop; what differs under DeepSpeed lives here, as
functions the loop calls at fixed points:

* :func:`check_launch_config` -- before the Accelerator is built and before any weights load: the
  recipe and the launch configuration (``accelerate launch`` flags, the DeepSpeed JSON of
  ``ds_configs/``) must not contradict each other. Contradictions stop the run with a
  :class:`~orpo.config.ConfigError` naming both files and the key.
* :func:`accelerator_device_kwargs` -- ``cpu=`` and the process-group backend for the Accelerator.
  Without CUDA, DDP needs ``cpu=True`` (gloo); DeepSpeed needs ``cpu=False`` (Accelerate ignores
  DeepSpeed when ``cpu=True``) and the gloo backend.
* :func:`whole_model_loading` -- around the model load: under ZeRO-3 the weights are loaded whole on
  the CPU (not partitioned by ``zero.Init`` while loading, which breaks Whisper's weight init in
  transformers 5.x); DeepSpeed partitions them in ``accelerator.prepare``.
* :func:`fill_deepspeed_config` -- before ``accelerator.prepare``: the JSON's ``"auto"`` values are
  filled from the recipe (micro-batch, accumulation, clipping) and from the Whisper config (bucket
  sizes). Accelerate would otherwise fill ``gradient_clipping`` with 1.0 whatever the recipe says.
* :func:`param_ndim`, :func:`param_numel` -- shapes of parameters, also of ones ZeRO-3 has
  partitioned (their data is then an empty placeholder).
* :func:`launch_prefix` -- the ``accelerate launch`` flags that start a run like this one (the
  printed resume command: a DeepSpeed checkpoint resumes only under DeepSpeed).
* :func:`peft_model_kwargs` -- ``autocast_adapter_dtype=False`` under ZeRO-3 (DeepSpeed #8072).
* :func:`generation_kwargs` -- ``synced_gpus=True`` for ``generate`` under ZeRO-3 with more than
  one process: a rank that finishes decoding early must keep joining the all-gathers of the others.
* :func:`consolidated_whisper` -- the final model as one Hugging Face model: under ZeRO-3 the 16-bit
  weights are gathered from all ranks (every process calls it) into a CPU copy on the main process,
  PEFT adapters included, so ``save_final_model`` writes full weights and a real adapter.
* :func:`check_deepspeed_checkpoint_files` -- ``accelerator.save_state`` under DeepSpeed writes the
  engine's own layout (``pytorch_model/``: model states and one optimizer shard per rank).

``python -m orpo.distributed --memory large-v3 --gpus 8`` prints the model-state memory per GPU
of each launch configuration (the README's Scaling table comes from it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import shlex
import sys
from pathlib import Path

import torch

from orpo.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

DEEPSPEED_TAG = "pytorch_model"  # accelerate.utils.MODEL_NAME: save_state's folder for the DeepSpeed engine


# --------------------------------------------------------------------------------------------------
# The launch environment


def uses_deepspeed(env=None) -> bool:
    """Launched by ``accelerate launch`` with DeepSpeed (``distributed_type: DEEPSPEED`` or ``--use_deepspeed``)."""
    env = os.environ if env is None else env
    return env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launch_prefix(num_processes: int, env=None) -> str:
    """The launcher part of a command that starts a run like this one (for the printed resume command).

    A DeepSpeed checkpoint resumes only under DeepSpeed, with the same config and number of processes.
    """
    env = os.environ if env is None else env
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", num_processes)))
    machines = max(1, int(env.get("WORLD_SIZE", num_processes)) // local)
    if uses_deepspeed(env):
        path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        flags = (["--deepspeed_config_file", shlex.quote(path)] if path != "none"
                 else ["--zero_stage", env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")])
        flags = ["--use_deepspeed"] + flags
    elif num_processes == 1:
        return "python"
    else:
        flags = ["--multi_gpu"]
    flags += ["--num_processes", str(num_processes)]
    if machines > 1:
        flags += ["--num_machines", str(machines), "--machine_rank", "MACHINE_RANK", "--main_process_ip",
                  env.get("MASTER_ADDR", "MAIN_IP"), "--main_process_port", env.get("MASTER_PORT", "29500")]
    return "accelerate launch " + " ".join(flags)


def accelerator_device_kwargs(env=None) -> dict:
    """``cpu`` and ``kwargs_handlers`` for ``Accelerator(...)``.

    With CUDA: Accelerate's defaults (NCCL). Without CUDA (tests, CPU machines): plain DDP needs
    ``cpu=True`` and gloo; DeepSpeed needs ``cpu=False`` (``cpu=True`` makes Accelerate skip DeepSpeed
    altogether) and gloo, with which DeepSpeed's CPU accelerator runs ZeRO-2 and ZeRO-3.
    """
    from accelerate.utils import InitProcessGroupKwargs

    env = os.environ if env is None else env
    if torch.cuda.is_available():
        return {"cpu": False, "kwargs_handlers": []}
    deepspeed = uses_deepspeed(env)
    distributed = int(env.get("WORLD_SIZE", "1")) > 1
    gloo = [InitProcessGroupKwargs(backend="gloo")] if distributed or deepspeed else []
    return {"cpu": not deepspeed, "kwargs_handlers": gloo}


def _accelerate_state():
    """The initialised AcceleratorState, or None (never creates one)."""
    from accelerate.state import AcceleratorState

    return AcceleratorState() if AcceleratorState._shared_state else None


def zero_stage(accelerator=None) -> int:
    """ZeRO stage of the running DeepSpeed engine configuration; 0 without DeepSpeed."""
    state = accelerator.state if accelerator is not None else _accelerate_state()
    plugin = getattr(state, "deepspeed_plugin", None) if state is not None else None
    if plugin is None:
        return 0
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def num_processes(accelerator=None) -> int:
    state = accelerator.state if accelerator is not None else _accelerate_state()
    return int(getattr(state, "num_processes", 1)) if state is not None else 1


def peft_model_kwargs(accelerator=None) -> dict:
    """Extra arguments of ``get_peft_model``: under ZeRO-3 the adapters keep the dtype they are created in
    (``autocast_adapter_dtype=False``), which avoids the LoRA dtype crash of some DeepSpeed versions under
    ZeRO-3 (DeepSpeed #8072)."""
    return {"autocast_adapter_dtype": False} if zero_stage(accelerator) == 3 else {}


def generation_kwargs(accelerator=None) -> dict:
    """Arguments for ``generate``: ``synced_gpus`` under ZeRO-3 with more than one process.

    Each forward of a ZeRO-3 model all-gathers its partitioned weights, so every rank must run the same
    number of decoding steps: with ``synced_gpus=True`` a rank whose transcripts are finished keeps
    stepping (without output) until all are. Without it, ranks with shorter transcripts leave the
    loop and the others hang.
    """
    return {"synced_gpus": zero_stage(accelerator) == 3 and num_processes(accelerator) > 1}


def param_ndim(p: torch.Tensor) -> int:
    """Dimensions of a parameter, also one that ZeRO-3 has partitioned (its data is then an empty placeholder).

    The trainer loads models whole (:func:`whole_model_loading`), so the optimizer sees real shapes; this keeps
    the weight-decay groups right should the model ever be partitioned before the optimizer is built.
    """
    shape = getattr(p, "ds_shape", None)
    return len(shape) if shape is not None else p.ndim


def param_numel(p: torch.Tensor) -> int:
    numel = getattr(p, "ds_numel", None)
    return int(numel) if numel is not None else p.numel()


# --------------------------------------------------------------------------------------------------
# Recipe versus launch configuration


def _recipe_origin(key: str, argv: list[str]) -> str:
    """Where a recipe key's value came from: the command line, the recipe file (--config), or the default."""
    if any(a == f"--{key}" or a.startswith(f"--{key}=") for a in argv):
        return f"command line (--{key})"
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return f"recipe {argv[i + 1]}"
        if a.startswith("--config="):
            return f"recipe {a.split('=', 1)[1]}"
    return "recipe defaults"


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _is_auto(value) -> bool:
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
            raise ConfigError(f"DeepSpeed config {path} (deepspeed_config_file of the accelerate config) does not "
                              f"exist; paths are relative to the folder you launch from ({Path.cwd()})")
        try:
            config = json.loads(file.read_text())
        except ValueError as err:
            raise ConfigError(f"DeepSpeed config {path}: not valid JSON: {err}") from None
        if not isinstance(config, dict) or not isinstance(config.get("zero_optimization"), dict):
            raise ConfigError(f"DeepSpeed config {path}: needs a 'zero_optimization' section with its 'stage'")
        return config, f"DeepSpeed config {path}"
    config = {"zero_optimization": {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))}}
    for key, name in (("gradient_accumulation_steps", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"),
                      ("gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING")):
        if env.get(name, "auto") != "auto":
            config[key] = float(env[name]) if key == "gradient_clipping" else int(env[name])
    offload = {"offload_optimizer": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
               "offload_param": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"}
    for key, name in offload.items():
        if env.get(name, "none") != "none":
            config["zero_optimization"][key] = {"device": env[name]}
    if env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "").lower() == "true":
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return config, "accelerate launch's DeepSpeed flags (--zero_stage, ...)"


def launch_problems(cfg: TrainConfig, env=None, argv: list[str] | None = None) -> list[str]:
    """Every contradiction between the recipe and the launch configuration, as messages (empty: none)."""
    env = os.environ if env is None else env
    argv = sys.argv[1:] if argv is None else argv
    origin = lambda key: _recipe_origin(key, argv)  # noqa: E731
    problems = []

    launch_precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launch_precision not in ("no", cfg.mixed_precision):
        problems.append(
            f"{origin('mixed_precision')}: mixed_precision is {cfg.mixed_precision!r}, but the accelerate launch "
            f"configuration (mixed_precision in the accelerate config file or --mixed_precision) says "
            f"{launch_precision!r}. The recipe sets the precision: leave the launch configuration at 'no', or "
            "make them agree.")
    if not uses_deepspeed(env):
        return problems

    ds, where = read_deepspeed_config(env)
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0)) if not _is_auto(zero.get("stage", 0)) else 0
    world = int(env.get("WORLD_SIZE", "1"))

    def disagree(recipe_key: str, recipe_value, ds_key: str, ds_value, hint: str = "") -> None:
        problems.append(
            f"{origin(recipe_key)}: {recipe_key} is {recipe_value!r}, but {where}: {ds_key} is {ds_value!r}. "
            + (hint or f"Set {ds_key} to \"auto\" in the DeepSpeed config (the trainer fills it from the recipe), "
                       "or make the two agree."))

    for section in ("optimizer", "scheduler"):
        if section in ds:
            problems.append(
                f"{where}: has a '{section}' section. The trainer builds AdamW from the recipe (learning_rate, "
                "weight_decay, adam_beta1/2, adam_epsilon) and steps the learning-rate schedule itself "
                f"(lr_scheduler_type, warmup_steps), once per optimizer step: remove the '{section}' section.")

    for dtype, recipe_value in (("fp16", "fp16"), ("bf16", "bf16")):
        enabled = _lookup(ds, f"{dtype}.enabled")
        if enabled is None or _is_auto(enabled):
            continue
        enabled = _as_bool(enabled)
        if enabled is None:
            problems.append(f"{where}: {dtype}.enabled must be true, false or \"auto\"")
        elif enabled != (cfg.mixed_precision == recipe_value):
            disagree("mixed_precision", cfg.mixed_precision, f"{dtype}.enabled", enabled,
                     f"Set {dtype}.enabled to \"auto\" in the DeepSpeed config (the recipe's mixed_precision fills "
                     "it), or make the two agree.")

    numeric = (("per_device_train_batch_size", cfg.per_device_train_batch_size, "train_micro_batch_size_per_gpu"),
               ("gradient_accumulation_steps", cfg.gradient_accumulation_steps, "gradient_accumulation_steps"),
               ("max_grad_norm", cfg.max_grad_norm, "gradient_clipping"))
    for recipe_key, recipe_value, ds_key in numeric:
        value = ds.get(ds_key)
        if value is None or _is_auto(value):
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            problems.append(f"{where}: {ds_key} must be a number or \"auto\", got {value!r}")
        elif not math.isclose(float(value), float(recipe_value), rel_tol=1e-9, abs_tol=0.0):
            disagree(recipe_key, recipe_value, ds_key, value)
    total = ds.get("train_batch_size")
    if total is not None and not _is_auto(total):
        expected = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
        if total != expected:
            problems.append(
                f"{origin('per_device_train_batch_size')}: per_device_train_batch_size "
                f"{cfg.per_device_train_batch_size} x gradient_accumulation_steps {cfg.gradient_accumulation_steps} "
                f"x {world} processes = {expected} clips per optimizer step, but {where}: train_batch_size is "
                f"{total!r}. Set train_batch_size to \"auto\".")

    if stage == 3:
        for key in ("load_in_8bit", "load_in_4bit"):
            if getattr(cfg, key):
                problems.append(
                    f"{origin(key)}: {key} is true, but {where}: zero_optimization.stage is 3. bitsandbytes "
                    "quantised weights cannot be partitioned by ZeRO-3 (4-bit would need bnb_4bit_quant_storage "
                    "equal to the compute dtype, which this trainer does not set up). Use ZeRO-2 "
                    "(accelerate_configs/deepspeed_zero2.yaml) or DDP with 8-bit/4-bit LoRA, or drop the "
                    "quantisation under ZeRO-3.")
        gather = _as_bool(zero.get("stage3_gather_16bit_weights_on_model_save", False))
        if not gather:
            problems.append(
                f"{where}: zero_optimization.stage3_gather_16bit_weights_on_model_save must be true under ZeRO-3: "
                f"the trainer gathers the full 16-bit weights to save one Hugging Face model in output_dir "
                f"({origin('output_dir')}).")
    if cfg.peft == "adalora":
        problems.append(
            f"{origin('peft')}: peft is 'adalora', but {where} runs DeepSpeed (ZeRO stage {stage}). AdaLoRA "
            "reallocates ranks from the gradients of its matrices after each optimizer step, and DeepSpeed "
            "steps and clears those gradients inside backward (and ZeRO partitions them). Use peft: lora, "
            "or AdaLoRA under DDP (accelerate_configs/multi_gpu.yaml).")
    return problems


def check_launch_config(cfg: TrainConfig, env=None, argv: list[str] | None = None) -> None:
    """Stop the run with a ConfigError when the recipe and the launch configuration contradict each other.

    Reads only the environment ``accelerate launch`` sets and the DeepSpeed JSON, so it runs before the
    Accelerator is built and before any weights load.
    """
    problems = launch_problems(cfg, env, argv)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("the recipe and the launch configuration disagree:\n" +
                          "\n".join(f"  - {p}" for p in problems))


# --------------------------------------------------------------------------------------------------
# Loading and accelerator.prepare


@contextlib.contextmanager
def whole_model_loading(accelerator=None):
    """Load models whole (not partitioned at construction) while a ZeRO-3 config is active.

    Accelerate registers its DeepSpeed config with transformers whenever the stage is 3, whatever
    ``zero3_init_flag`` says, and ``from_pretrained`` then builds the model inside ``zero.Init``. For
    Whisper in transformers 5.x that fails (``WhisperPreTrainedModel._init_weights`` reads the shape of
    the encoder's partitioned position embedding: ``sinusoids() missing 1 required positional argument``).
    Here the registration is lifted for the load, so each process reads the whole checkpoint into CPU
    memory; ``accelerator.prepare`` hands the model to DeepSpeed, which partitions it.
    """
    plugin = getattr(accelerator.state if accelerator is not None else _accelerate_state(), "deepspeed_plugin", None)
    if plugin is None or zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if plugin.zero3_init_flag:
        logger.warning("zero3_init_flag is true: the model is loaded whole all the same (partitioned loading fails "
                       "for Whisper in this transformers version); DeepSpeed partitions it in accelerator.prepare")
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _fill(config: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    if _is_auto(node.get(parts[-1])):
        node[parts[-1]] = value


def fill_deepspeed_config(accelerator, cfg: TrainConfig, model_config) -> dict | None:
    """Fill the DeepSpeed config's ``"auto"`` values from the recipe and the Whisper config (in place).

    Call after building the Accelerator and before ``accelerator.prepare``. Accelerate fills the batch
    sizes itself, but ``gradient_clipping`` it sets to 1.0 and the hidden-size based bucket sizes need a
    ``config.hidden_size`` on the prepared module, which ORPOWhisper does not have. The values follow
    Hugging Face Trainer's rules (``d_model`` is Whisper's hidden size). Returns the config (None
    without DeepSpeed).
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return None
    ds = plugin.deepspeed_config
    micro, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", micro)
    _fill(ds, "gradient_accumulation_steps", accumulation)
    _fill(ds, "train_batch_size", micro * accumulation * accelerator.num_processes)
    _fill(ds, "gradient_clipping", float(cfg.max_grad_norm))  # 0 turns clipping off in both
    hidden = int(model_config.d_model)
    _fill(ds, "zero_optimization.reduce_bucket_size", hidden * hidden)
    _fill(ds, "zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
    _fill(ds, "zero_optimization.stage3_param_persistence_threshold", 10 * hidden)
    return ds


# --------------------------------------------------------------------------------------------------
# Saving


def consolidated_whisper(accelerator, model) -> torch.nn.Module | None:
    """The trained Whisper (PEFT wrapper included) with all its weights, for ``save_final_model``.

    Every process must call this. Without ZeRO-3 it is the unwrapped model itself. Under ZeRO-3 each
    rank holds a shard of every weight: the full 16-bit weights are gathered with
    ``accelerator.get_state_dict`` (``stage3_gather_16bit_weights_on_model_save``), the ``whisper.``
    prefix of ORPOWhisper is stripped, and the main process loads them into a new CPU copy of the same
    model (with the same adapters), which it returns; the other processes get None. Tied weights
    (``proj_out`` and ``embed_tokens``) stay tied, as in the copy they are one parameter.
    """
    whisper = accelerator.unwrap_model(model).whisper
    if zero_stage(accelerator) != 3:
        return whisper
    state = accelerator.get_state_dict(model)  # all ranks take part; the main process gets the dict
    if not accelerator.is_main_process:
        return None
    prefix = "whisper."
    state = {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}
    base = whisper.get_base_model() if hasattr(whisper, "get_base_model") else whisper
    with whole_model_loading(accelerator):
        copy_ = type(base)(copy.deepcopy(base.config))
    copy_.generation_config = copy.deepcopy(base.generation_config)
    if hasattr(whisper, "peft_config"):
        from peft import get_peft_model

        adapter = whisper.active_adapter if isinstance(whisper.active_adapter, str) else whisper.active_adapters[0]
        copy_ = get_peft_model(copy_, copy.deepcopy(whisper.peft_config[adapter]), adapter_name=adapter,
                               autocast_adapter_dtype=False)
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    if floating:
        copy_.to(floating[0])
    missing, unexpected = copy_.load_state_dict(state, strict=False)
    tied = set(getattr(base, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if not any(m.endswith(t) for t in tied)]
    if missing or unexpected:
        raise RuntimeError(f"the gathered ZeRO-3 weights do not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return copy_.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Checkpoints


def check_deepspeed_checkpoint_files(folder: str | Path, world_size: int, custom_objects: int) -> None:
    """Every file that ``accelerator.load_state`` reads from a DeepSpeed checkpoint is there.

    ``save_state`` under DeepSpeed writes the engine's checkpoint into ``pytorch_model/`` (model states,
    and one optimizer shard per rank with ZeRO), the objects registered for checkpointing
    (``custom_checkpoint_N.pkl``) and the random states of every process. A ZeRO checkpoint is bound to
    its number of processes.
    """
    from orpo.checkpoint import CheckpointError

    folder = Path(folder)
    engine = folder / DEEPSPEED_TAG
    missing = []
    if not engine.is_dir():
        missing.append(f"{DEEPSPEED_TAG}/ (the DeepSpeed engine's checkpoint; a checkpoint written without "
                       "DeepSpeed cannot be resumed under DeepSpeed)")
    else:
        if not list(engine.glob("*model_states.pt")):
            missing.append(f"{DEEPSPEED_TAG}/*model_states.pt")
        shards = list(engine.glob("*optim_states.pt"))
        if shards and len(shards) != world_size:
            raise CheckpointError(f"checkpoint {folder} holds optimizer shards of {len(shards)} processes; this run "
                                  f"has {world_size}. A ZeRO checkpoint resumes with the same number of processes.")
        if not shards:
            missing.append(f"{DEEPSPEED_TAG}/*optim_states.pt")
    missing += [f"custom_checkpoint_{i}.pkl" for i in range(custom_objects)
                if not (folder / f"custom_checkpoint_{i}.pkl").is_file()]
    missing += [f"random_states_{r}.pkl" for r in range(world_size) if not (folder / f"random_states_{r}.pkl").is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete or was written with other settings: "
                              f"{', '.join(missing)} missing")


# --------------------------------------------------------------------------------------------------
# Memory per GPU


# Parameter counts of the released checkpoints (OpenAI's model card).
MODEL_PARAMETERS = {
    "tiny": 39e6, "base": 74e6, "small": 244e6, "medium": 769e6, "large-v3": 1550e6, "large-v3-turbo": 809e6,
}
GIB = 1024 ** 3

# Bytes per parameter of the model states in mixed-precision training with Adam (ZeRO paper, section 3):
# 16-bit parameters, 16-bit gradients, and fp32 master weights + Adam's two moments.
PARAM_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12

LAUNCHES = ("ddp", "zero2", "zero3", "zero3_offload")
LAUNCH_CONFIG = {"ddp": "multi_gpu.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml",
                 "zero3_offload": "deepspeed_zero3_offload.yaml"}


def model_state_bytes(parameters: float, gpus: int, launch: str) -> dict[str, float]:
    """Model-state bytes per GPU and per process in CPU memory, for a full fine-tune with AdamW.

    * ddp: every GPU holds everything (16 B/param; the trainer keeps fp32 weights and autocasts, which
      is the same 4 + 4 + 8 bytes).
    * zero2: 16-bit parameters replicated; gradients and optimizer states sharded over the GPUs.
    * zero3: parameters, gradients and optimizer states all sharded.
    * zero3_offload: parameters and optimizer states live in CPU memory (sharded over processes); the
      GPU keeps only the layers being computed (activations and the live-parameter buffer come on top).
    Activations, the CUDA context and allocator slack come on top of every figure.
    """
    n, g = float(parameters), int(gpus)
    if launch == "ddp":
        return {"gpu": n * (PARAM_BYTES + GRAD_BYTES + OPTIMIZER_BYTES), "cpu": 0.0}
    if launch == "zero2":
        return {"gpu": n * PARAM_BYTES + n * (GRAD_BYTES + OPTIMIZER_BYTES) / g, "cpu": 0.0}
    if launch == "zero3":
        return {"gpu": n * (PARAM_BYTES + GRAD_BYTES + OPTIMIZER_BYTES) / g, "cpu": 0.0}
    if launch == "zero3_offload":
        return {"gpu": 0.0, "cpu": n * (PARAM_BYTES + GRAD_BYTES + OPTIMIZER_BYTES) / g}
    raise ValueError(f"unknown launch {launch!r}; one of {', '.join(LAUNCHES)}")


def memory_table(models: list[str], gpus: int) -> str:
    """A Markdown table: model-state GiB per GPU for each launch configuration, with ``gpus`` GPUs."""
    header = ["model", "parameters", "DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3 offload (GPU / CPU per process)"]
    rows = []
    for name in models:
        n = MODEL_PARAMETERS[name] if name in MODEL_PARAMETERS else float(name)
        cells = [name, f"{n / 1e6:,.0f}M"]
        for launch in LAUNCHES:
            b = model_state_bytes(n, gpus, launch)
            cells.append(f"{b['gpu'] / GIB:.2f} GiB" if launch != "zero3_offload"
                         else f"layers in use / {b['cpu'] / GIB:.2f} GiB")
        rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orpo.distributed",
        description="Model-state memory per GPU (16-bit weights and gradients, fp32 Adam states) of each launch "
                    "configuration, for a full fine-tune. Activations come on top.")
    parser.add_argument("--memory", nargs="*", metavar="MODEL", default=list(MODEL_PARAMETERS),
                        help=f"model names ({', '.join(MODEL_PARAMETERS)}) or parameter counts such as 1.55e9 "
                             "(default: all models)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs (processes) in the run (default: 8)")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error("--gpus must be >= 1")
    for name in args.memory:
        if name not in MODEL_PARAMETERS:
            try:
                float(name)
            except ValueError:
                parser.error(f"unknown model {name!r}; one of {', '.join(MODEL_PARAMETERS)} or a parameter count")
    models = args.memory or list(MODEL_PARAMETERS)
    print(f"Model states per GPU with {args.gpus} GPU{'s' if args.gpus > 1 else ''} (full fine-tune, AdamW; "
          "activations not included):\n")
    print(memory_table(models, args.gpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
