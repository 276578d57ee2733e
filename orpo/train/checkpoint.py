"""Training checkpoints: atomic saves, rotation, finding the latest complete one, and checks before resuming.

A checkpoint is the folder ``output_dir/checkpoint-STEP``. It holds what ``Accelerator.save_state`` writes
(the model weights, or with PEFT only the adapter; the optimizer; objects registered for checkpointing such as
the learning-rate scheduler; the random states of every process) and ``trainer_state.json`` with the position in
training (``global_step``, ``epoch``, ``step_in_epoch``: batches of this process consumed in the epoch) and the
settings that position depends on.

Everything is written into ``output_dir/.tmp-checkpoint-STEP`` first; ``trainer_state.json`` is written last and
the folder is then renamed into place. A folder is a complete checkpoint only when it holds
``trainer_state.json``, so a save cut short by a crash is never mistaken for one.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import OrderedDict
from pathlib import Path

import torch

from orpo.errors import CheckpointError
from orpo.files import publish_dir, write_text_atomic
from orpo.scale.launch import unwrap_model
from orpo.scale.zero3 import deepspeed_checkpoint_problems

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
MODEL_FILE = "model.safetensors"  # accelerate.utils.SAFE_WEIGHTS_NAME
OPTIMIZER_FILE = "optimizer.bin"  # accelerate.utils.OPTIMIZER_NAME + ".bin"
SCALER_FILE = "scaler.pt"  # accelerate.utils.SCALER_NAME (fp16 only)


def read_trainer_state(folder: Path) -> dict:
    path = Path(folder) / STATE_NAME
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder} is not a complete checkpoint: it has no {STATE_NAME} (written last, so "
            "the save was cut short or this is not a checkpoint folder)"
        ) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from None
    for key in ("global_step", "epoch", "step_in_epoch"):
        if not isinstance(state.get(key), int) or state[key] < 0:
            raise CheckpointError(f"{path}: '{key}' is missing or not a non-negative integer")
    return state


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(global_step, folder) of every complete checkpoint in ``output_dir``, oldest step first."""
    found = []
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return found
    for folder in output_dir.iterdir():
        if folder.is_dir() and folder.name.startswith(PREFIX) and (folder / STATE_NAME).is_file():
            try:
                found.append((read_trainer_state(folder)["global_step"], folder))
            except CheckpointError as err:
                logger.warning("ignoring %s: %s", folder, err)
    return sorted(found)


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """The folder named by ``resume_from_checkpoint``: a path, or ``latest`` (newest complete one in output_dir)."""
    output_dir = Path(output_dir)
    if spec == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            partial = sorted(p.name for p in output_dir.glob(f"{PREFIX}*") if p.is_dir()) if output_dir.is_dir() else []
            detail = f" (incomplete, without {STATE_NAME}: {', '.join(partial)})" if partial else ""
            raise CheckpointError(
                f"resume_from_checkpoint latest: output_dir {output_dir} holds no complete checkpoint{detail}. "
                "Checkpoints are written every save_steps steps and when a run is stopped by SIGTERM/SIGINT; "
                "to start from scratch, leave out --resume_from_checkpoint."
            )
        return found[-1][1]
    folder = Path(spec)
    if not folder.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: {folder} is not a folder")
    read_trainer_state(folder)
    return folder


def check_checkpoint_files(
    folder: Path, world_size: int, custom_objects: int, scaler: bool, deepspeed: bool = False
) -> None:
    """Every file that ``Accelerator.load_state`` will read is there.

    ``custom_objects``: how many objects this run registered for checkpointing. ``deepspeed``: the model and
    optimizer are in the DeepSpeed engine's layout (``pytorch_model/``), not in Accelerate's own files.
    """
    folder = Path(folder)
    required = [] if deepspeed else [MODEL_FILE, OPTIMIZER_FILE]
    required += [f"custom_checkpoint_{i}.pkl" for i in range(custom_objects)]
    required += [f"random_states_{rank}.pkl" for rank in range(world_size)]
    required += [SCALER_FILE] if scaler else []
    missing = [name for name in required if not (folder / name).is_file()]
    if deepspeed:
        missing = deepspeed_checkpoint_problems(folder, world_size) + missing
    if missing:
        raise CheckpointError(
            f"checkpoint {folder} is incomplete or was written with other settings: {', '.join(missing)} missing"
        )


def checkpoint_state_dict(model: torch.nn.Module, adapter_only: bool) -> OrderedDict:
    """The weights a checkpoint keeps: all of them, or with PEFT the trainable ones and the adapters' own.

    The frozen base model is loaded from ``base_model`` again on resume, so an adapter checkpoint stays small.
    """
    state = model.state_dict()
    if not adapter_only:
        return state
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    keep |= {name for name in state if "lora_" in name or ".ranknum." in name}
    return OrderedDict((name, tensor) for name, tensor in state.items() if name in keep)


def load_checkpoint_weights(model: torch.nn.Module, folder: Path, adapter_only: bool) -> None:
    """Load the checkpoint's weights into ``model``, checking that every key matches: never a partial load."""
    from safetensors.torch import load_file, load_model

    path = Path(folder) / MODEL_FILE
    if not adapter_only:
        try:
            load_model(model, str(path), strict=True)
        except (RuntimeError, OSError, ValueError) as err:
            raise CheckpointError(f"{path} does not fit this model: {err}") from None
        return
    try:
        stored = load_file(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from None
    expected = set(checkpoint_state_dict(model, adapter_only=True))
    missing, unexpected = sorted(expected - set(stored)), sorted(set(stored) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model's adapters (were peft, lora_r or "
            f"lora_target_modules changed?): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    shapes = [
        name for name, tensor in model.state_dict().items() if name in stored and stored[name].shape != tensor.shape
    ]
    if shapes:
        raise CheckpointError(f"{path}: shapes differ from this model's for {shapes[:5]}")
    model.load_state_dict(stored, strict=False)


def finalize_checkpoint(staging: Path, final: Path, state: dict) -> None:
    """Write ``trainer_state.json`` last, then flush the folder to disk and rename it into place (until the rename
    it is a ``.tmp-`` folder, which is never taken for a checkpoint)."""
    write_text_atomic(staging / STATE_NAME, json.dumps(state, indent=2) + "\n")
    publish_dir(staging, final, aside=final.with_name(f"{TMP_PREFIX}{final.name}.old"))


def rotate_checkpoints(output_dir: Path, newest: Path, limit: int) -> None:
    """Keep ``newest`` and at most ``limit`` complete checkpoints in all (0: keep all).

    Checkpoints at later steps than ``newest`` come from a run this one replaced (started afresh, or resumed from
    an earlier checkpoint): they are removed so that ``latest`` always means the last save.
    """
    found = complete_checkpoints(output_dir)
    newest_step = read_trainer_state(newest)["global_step"]
    others = [(step, folder) for step, folder in found if folder.resolve() != newest.resolve()]
    for step, folder in others:
        if step > newest_step:
            logger.warning("removing %s: it is from an earlier run that this one replaced", folder)
            shutil.rmtree(folder, ignore_errors=True)
    others = [(step, folder) for step, folder in others if step <= newest_step]
    if limit > 0:
        for _, folder in others[: max(0, len(others) + 1 - limit)]:
            logger.info("removing old checkpoint %s (save_total_limit %d)", folder, limit)
            shutil.rmtree(folder, ignore_errors=True)


def remove_stale_staging(output_dir: Path) -> None:
    """Temporary folders of saves that a crash cut short."""
    if Path(output_dir).is_dir():
        for folder in Path(output_dir).glob(f"{TMP_PREFIX}*"):
            logger.info("removing %s, left by an interrupted save", folder)
            shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: Path, record: dict, save_total_limit: int) -> Path:
    """Everything needed to continue exactly (``record`` is the run's ``trainer_state.json``), staged in a
    temporary folder that is renamed into place once complete; then older checkpoints are rotated out."""
    step = record["global_step"]
    staging, final = output_dir / f"{TMP_PREFIX}{step}", output_dir / f"{PREFIX}{step}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finalize_checkpoint(staging, final, record)
        rotate_checkpoints(output_dir, final, save_total_limit)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def register_weight_hooks(accelerator, adapter_only: bool) -> None:
    """Checkpoints keep only the adapter with PEFT (the frozen base is loaded from base_model again), and every
    key is checked when loading."""

    def save_weights(models, weights, folder):
        if weights:
            weights[0] = checkpoint_state_dict(unwrap_model(models[0], accelerator), adapter_only)

    def load_weights(models, folder):
        if models:
            load_checkpoint_weights(unwrap_model(models[0], accelerator), Path(folder), adapter_only)
            models.clear()

    accelerator.register_save_state_pre_hook(save_weights)
    accelerator.register_load_state_pre_hook(load_weights)


def load_checkpoint(accelerator, folder: Path) -> None:
    """``accelerator.load_state``: a model that did not load completely never trains."""
    try:
        accelerator.load_state(str(folder))
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"cannot resume from {folder}: {type(err).__name__}: {err}") from err
