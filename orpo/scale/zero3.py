"""DeepSpeed ZeRO-3 (and ZeRO-2) at the fixed points of the loop: loading, preparing, generating, saving.

* :func:`whole_model_loading` -- around the model load: under ZeRO-3 the weights are loaded whole on the
  CPU (partitioned loading through ``zero.Init`` fails for Whisper in transformers 5); DeepSpeed
  partitions them in ``accelerator.prepare``.
* :func:`fill_deepspeed_config` -- before ``accelerator.prepare``: the JSON's ``"auto"`` values from the
  recipe and the Whisper config.
* :func:`generation_kwargs` -- ``synced_gpus`` for ``generate`` under multi-process ZeRO-3.
* :func:`peft_model_kwargs` -- ``autocast_adapter_dtype=False`` under ZeRO-3 (DeepSpeed #8072).
* :func:`consolidated_whisper` -- the final model gathered whole from all ranks.
* :func:`deepspeed_checkpoint_problems` -- the engine's checkpoint layout, before resuming;
  :func:`deepspeed_checkpoint_globals` -- the classes its pickles may hold, checked before DeepSpeed unpickles them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import torch

from orpo.config import TrainConfig
from orpo.errors import CheckpointError
from orpo.scale.checks import is_auto
from orpo.scale.launch import accelerate_state, num_processes, unwrap_model, zero_stage

logger = logging.getLogger(__name__)

DEEPSPEED_TAG = "pytorch_model"  # accelerate.utils.MODEL_NAME: save_state's folder for the DeepSpeed engine


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
    plugin = getattr(accelerator.state if accelerator is not None else accelerate_state(), "deepspeed_plugin", None)
    if plugin is None or zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if plugin.zero3_init_flag:
        logger.warning(
            "zero3_init_flag is true: the model is loaded whole all the same (partitioned loading fails "
            "for Whisper in this transformers version); DeepSpeed partitions it in accelerator.prepare"
        )
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
    if is_auto(node.get(parts[-1])):
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


def consolidated_whisper(accelerator, model) -> torch.nn.Module | None:
    """The trained Whisper (PEFT wrapper included) with all its weights, for ``save_final_model``.

    Every process must call this. Without ZeRO-3 it is the unwrapped model itself. Under ZeRO-3 each
    rank holds a shard of every weight: the full 16-bit weights are gathered with
    ``accelerator.get_state_dict`` (``stage3_gather_16bit_weights_on_model_save``), the ``whisper.``
    prefix of ORPOWhisper is stripped, and the main process loads them into a new CPU copy of the same
    model (with the same adapters), which it returns; the other processes get None. Tied weights
    (``proj_out`` and ``embed_tokens``) stay tied, as in the copy they are one parameter.
    """
    whisper = unwrap_model(model, accelerator).whisper
    if zero_stage(accelerator) != 3:
        return whisper
    state = accelerator.get_state_dict(model)  # all ranks take part; the main process gets the dict
    if not accelerator.is_main_process:
        return None
    prefix = "whisper."
    state = {name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)}
    base = whisper.get_base_model() if hasattr(whisper, "get_base_model") else whisper
    with whole_model_loading(accelerator):
        copy_ = type(base)(copy.deepcopy(base.config))
    copy_.generation_config = copy.deepcopy(base.generation_config)
    if hasattr(whisper, "peft_config"):
        from peft import get_peft_model

        adapter = whisper.active_adapter if isinstance(whisper.active_adapter, str) else whisper.active_adapters[0]
        copy_ = get_peft_model(
            copy_, copy.deepcopy(whisper.peft_config[adapter]), adapter_name=adapter, autocast_adapter_dtype=False
        )
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    if floating:
        copy_.to(floating[0])
    missing, unexpected = copy_.load_state_dict(state, strict=False)
    tied = set(getattr(base, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if not any(m.endswith(t) for t in tied)]
    if missing or unexpected:
        raise RuntimeError(
            f"the gathered ZeRO-3 weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return copy_.eval().requires_grad_(False)


def deepspeed_checkpoint_globals() -> list:
    """The classes besides tensors and plain data that the DeepSpeed engine pickles into ``pytorch_model/*.pt``
    (found in ZeRO-2 and ZeRO-3 checkpoints: the optimizer's loss scaler, the ZeRO stage, ZeRO-2's fragment
    addresses). DeepSpeed unpickles these files with ``weights_only=False``; a file that loads with
    ``weights_only=True`` and only these allowed is safe to hand to it. Without DeepSpeed installed there are none
    to allow, and such a file is refused."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def deepspeed_checkpoint_problems(folder: str | Path, world_size: int) -> list[str]:
    """The DeepSpeed engine's files a checkpoint lacks (``accelerator.save_state`` under DeepSpeed writes
    ``pytorch_model/``: model states, and one optimizer shard per rank with ZeRO). A ZeRO checkpoint is bound
    to its number of processes: a different count of shards is an error."""
    engine = Path(folder) / DEEPSPEED_TAG
    if not engine.is_dir():
        return [
            f"{DEEPSPEED_TAG}/ (the DeepSpeed engine's checkpoint; a checkpoint written without "
            "DeepSpeed cannot be resumed under DeepSpeed)"
        ]
    missing = [] if list(engine.glob("*model_states.pt")) else [f"{DEEPSPEED_TAG}/*model_states.pt"]
    shards = list(engine.glob("*optim_states.pt"))
    if shards and len(shards) != world_size:
        raise CheckpointError(
            f"checkpoint {folder} holds optimizer shards of {len(shards)} processes; this run "
            f"has {world_size}. A ZeRO checkpoint resumes with the same number of processes."
        )
    return missing + ([] if shards else [f"{DEEPSPEED_TAG}/*optim_states.pt"])
