"""Training checkpoints: atomic saves, rotation, finding the latest complete one, and checks before resuming.

A checkpoint is the folder ``output_dir/checkpoint-STEP``. It holds what ``Accelerator.save_state`` writes:

* ``model.safetensors``: the model weights (with PEFT only the adapter's), and ``optimizer.bin``: the optimizer's
  state; under DeepSpeed both are the engine's ``pytorch_model/`` (model states, one optimizer shard per process);
* ``scaler.pt``: the fp16 gradient scaler's state; ``random_states_RANK.pkl``: each process's random states;
* ``scheduler.json``: the learning-rate scheduler's state; with AdaLoRA, ``adalora_state.json`` and
  ``adalora_state.safetensors``: its rank allocator's. The hooks of :func:`register_checkpoint_hooks` write these
  as JSON and safetensors: this project pickles nothing;

and ``trainer_state.json`` with the position in training (``global_step``, ``epoch``, ``step_in_epoch``: batches of
this process consumed in the epoch) and the settings that position depends on.

Everything is written into ``output_dir/.tmp-checkpoint-STEP`` first; ``trainer_state.json`` is written last and
the folder is then renamed into place. A folder is a complete checkpoint only when it holds
``trainer_state.json``, so a save cut short by a crash is never mistaken for one. A save that fills the disk is a
:class:`~orpo.errors.DiskFullError`, its staging folder removed and the checkpoints before it untouched.

Before resuming, every file is read in full (:func:`checkpoint_file_problems`): a truncated or corrupt one is an
error naming the newest complete checkpoint before it, and a pickle (``.bin``, ``.pkl``, ``.pt``) must load with
``torch.load(weights_only=True)``: one holding other objects than tensors and plain data (which could run code when
unpickled) is refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shlex
import shutil
import weakref
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from accelerate.utils.other import TORCH_SAFE_GLOBALS
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file

from orpo.errors import CheckpointError, DiskFullError
from orpo.files import disk_full_guard, publish_dir, write_text_atomic
from orpo.scale.launch import unwrap_model
from orpo.scale.zero3 import DEEPSPEED_TAG, deepspeed_checkpoint_globals, deepspeed_checkpoint_problems, param_numel

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
MODEL_FILE = "model.safetensors"  # accelerate.utils.SAFE_WEIGHTS_NAME
OPTIMIZER_FILE = "optimizer.bin"  # accelerate.utils.OPTIMIZER_NAME + ".bin"
SCALER_FILE = "scaler.pt"  # accelerate.utils.SCALER_NAME (fp16 only)
PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")  # torch.save files: a zip around a pickle
# Objects registered with Accelerate before: it unpickles them with weights_only=False, so they are never read.
PICKLED_STATE = re.compile(r"custom_checkpoint_\d+\.pkl")
TENSOR = "__tensor__"  # {"__tensor__": key} in NAME.json stands for the tensor ``key`` of NAME.safetensors

# Accelerate keeps the prepared model to itself: how big a save of each accelerator is, for a full disk's message.
SAVE_SIZES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at optimizer step ``step``."""
    return f"{PREFIX}{step}"


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
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a JSON object")
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


def name_step(folder: Path) -> int | None:
    """The step in a folder's name ``checkpoint-STEP`` (None for another name)."""
    rest = folder.name[len(PREFIX) :] if folder.name.startswith(PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def earlier_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint beside ``folder`` at an earlier step whose files all read."""
    folder = Path(folder)
    try:
        step = read_trainer_state(folder)["global_step"]
    except CheckpointError:
        step = name_step(folder)
    for other_step, other in reversed(complete_checkpoints(folder.parent)):
        if other.resolve() != folder.resolve() and (step is None or other_step < step):
            if not checkpoint_file_problems(other):
                return other
    return None


def broken_checkpoint(folder: Path, problem: str) -> CheckpointError:
    """The error for a checkpoint that cannot be resumed from, with the exact option that uses the newest complete
    checkpoint before it instead (or, with none, how to start afresh)."""
    earlier = earlier_checkpoint(folder)
    if earlier is None:
        advice = f"{Path(folder).parent} holds no complete checkpoint before it; to start afresh, leave out "
        advice += "--resume_from_checkpoint."
    else:
        advice = f"The newest complete checkpoint before it is {earlier}; to resume from it instead: "
        advice += f"--resume_from_checkpoint {shlex.quote(str(earlier))}"
    return CheckpointError(f"{problem}. {advice}")


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """The folder named by ``resume_from_checkpoint``: a path, or ``latest`` (newest complete one in output_dir),
    its files read in full (:func:`checkpoint_file_problems`) before any weights load.

    A newer checkpoint whose ``trainer_state.json`` does not read is an error, not passed over for an older one.
    """
    output_dir = Path(output_dir)
    if spec == "latest":
        found = complete_checkpoints(output_dir)
        folders = sorted(p for p in output_dir.glob(f"{PREFIX}*") if p.is_dir()) if output_dir.is_dir() else []
        newest = found[-1][0] if found else -1
        for folder in folders:
            step = name_step(folder)
            if (folder / STATE_NAME).is_file() and (step is None or step > newest):
                try:
                    read_trainer_state(folder)
                except CheckpointError as err:
                    raise broken_checkpoint(folder, f"checkpoint {folder} cannot be resumed from: {err}") from None
        if not found:
            partial = [p.name for p in folders]
            detail = f" (incomplete, without {STATE_NAME}: {', '.join(partial)})" if partial else ""
            raise CheckpointError(
                f"resume_from_checkpoint latest: output_dir {output_dir} holds no complete checkpoint{detail}. "
                "Checkpoints are written every save_steps steps and when a run is stopped by SIGTERM/SIGINT; "
                "to start from scratch, leave out --resume_from_checkpoint."
            )
        return readable_checkpoint(found[-1][1])
    folder = Path(spec)
    if not folder.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: {folder} is not a folder")
    try:
        read_trainer_state(folder)
    except CheckpointError as err:
        raise broken_checkpoint(folder, str(err)) from None
    return readable_checkpoint(folder)


def readable_checkpoint(folder: Path) -> Path:
    """``folder``, once each of its files has read safely and whole."""
    problems = checkpoint_file_problems(folder)
    if problems:
        raise broken_checkpoint(folder, f"checkpoint {folder} cannot be resumed from: {'; '.join(problems)}")
    return folder


def load_torch_file(path: Path, extra_globals=()):
    """``torch.load`` that unpickles nothing but tensors and plain data (with numpy's arrays and dtypes, as
    Accelerate allows for the random states, and ``extra_globals``), the tensors memory-mapped."""
    with torch.serialization.safe_globals([*TORCH_SAFE_GLOBALS, *extra_globals]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def torch_file_problem(path: Path, extra_globals: list) -> str | None:
    """What keeps a ``torch.save`` file from loading safely and whole (None: nothing)."""
    if not zipfile.is_zipfile(path):
        return f"{path.name} is not a torch.save (zip) file: it is truncated or corrupt, and will not be unpickled"
    try:
        load_torch_file(path, extra_globals)
    except pickle.UnpicklingError as err:
        if not str(err).startswith("Weights only load failed"):
            return f"{path.name} cannot be read (truncated or corrupt): {err}"
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        reason = f"it refers to {named.group(1)}" if named else str(err).strip().splitlines()[-1]
        return (
            f"{path.name} holds objects other than tensors and plain data ({reason}): unpickling it could run "
            "code, so it is refused"
        )
    except Exception as err:  # torch.load reports a damaged archive in many types
        return f"{path.name} cannot be read (truncated or corrupt): {type(err).__name__}: {err}"
    return None


def file_problem(path: Path) -> str | None:
    """What is wrong with one file of a checkpoint for resuming (None: it reads whole, or resuming never reads it)."""
    if PICKLED_STATE.fullmatch(path.name):
        return (
            f"{path.name} is the scheduler's (or AdaLoRA's) state pickled by an earlier version, which Accelerate "
            "unpickles with code execution: it is not read (checkpoints now keep it in scheduler.json)"
        )
    if path.suffix in PICKLE_SUFFIXES:
        return torch_file_problem(path, [])
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                list(f.keys())
    except Exception as err:  # json, UnicodeDecodeError, safetensors' own error type
        return f"{path.name} cannot be read (truncated or corrupt): {err}"
    return None


def engine_file_problems(folder: Path) -> list[str]:
    """What keeps each of the DeepSpeed engine's files (``pytorch_model/*``), which DeepSpeed unpickles with
    ``weights_only=False``, from loading safely and whole with only the classes it needs allowed."""
    files = sorted(p for p in (Path(folder) / DEEPSPEED_TAG).rglob("*") if p.is_file())
    allowed = deepspeed_checkpoint_globals() if files else []
    problems = [torch_file_problem(path, allowed) if path.suffix in PICKLE_SUFFIXES else None for path in files]
    return [f"{DEEPSPEED_TAG}/{problem}" for problem in problems if problem is not None]


def checkpoint_file_problems(folder: Path) -> list[str]:
    """Every file of ``folder`` that resuming reads, read in full before any state is changed: what is wrong with
    each (truncated, corrupt, or a pickle of objects that could run code)."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    problems = [file_problem(path) for path in files]
    return [problem for problem in problems if problem is not None] + engine_file_problems(folder)


def check_checkpoint_files(folder: Path, world_size: int, state_names, scaler: bool, deepspeed: bool = False) -> None:
    """Every file that ``Accelerator.load_state`` and the hooks will read is there (that each reads safely and whole
    :func:`resolve_checkpoint` has checked).

    ``state_names``: the names of the objects this run keeps in checkpoints (``register_checkpoint_hooks``).
    ``deepspeed``: the model and optimizer are in the DeepSpeed engine's layout (``pytorch_model/``), not in
    Accelerate's own files.
    """
    folder = Path(folder)
    required = [] if deepspeed else [MODEL_FILE, OPTIMIZER_FILE]
    required += [f"{name}.json" for name in state_names]
    required += [f"random_states_{rank}.pkl" for rank in range(world_size)]
    required += [SCALER_FILE] if scaler else []
    missing = [name for name in required if not (folder / name).is_file()]
    if deepspeed:
        missing = deepspeed_checkpoint_problems(folder, world_size) + missing
    if missing:
        raise broken_checkpoint(
            folder,
            f"checkpoint {folder} is incomplete or was written with other settings: {', '.join(missing)} missing",
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


def checkpoint_bytes(model: torch.nn.Module, adapter_only: bool) -> int:
    """About what a checkpoint writes: the weights it keeps, and AdamW's two float32 moments per trainable one."""
    params = list(model.parameters())
    kept = sum(param_numel(p) * p.element_size() for p in params if p.requires_grad or not adapter_only)
    return kept + 8 * sum(param_numel(p) for p in params if p.requires_grad)


def load_checkpoint_weights(model: torch.nn.Module, folder: Path, adapter_only: bool) -> None:
    """Load the checkpoint's weights into ``model``, checking that every key matches: never a partial load."""
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


def split_tensors(value, key: str, tensors: dict):
    """``value`` as JSON data, each tensor in it moved into ``tensors`` under its path and left as a placeholder."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {TENSOR: key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"state {key!r}: keys must be strings to be kept as JSON")
        return {k: split_tensors(v, f"{key}/{k}" if key else k, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_tensors(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
    return value


def join_tensors(value, tensors: dict):
    """The inverse of :func:`split_tensors`."""
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            if value[TENSOR] not in tensors:
                raise ValueError(f"tensor {value[TENSOR]!r} is not in the .safetensors file")
            return tensors[value[TENSOR]]
        return {k: join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


def save_state_objects(objects: dict, folder: Path) -> None:
    """Each object's ``state_dict()`` as ``NAME.json``, its tensors (if any) in ``NAME.safetensors``."""
    for name, obj in objects.items():
        tensors = {}
        data = split_tensors(obj.state_dict(), "", tensors)
        if tensors:
            save_file(tensors, str(folder / f"{name}.safetensors"))
        (folder / f"{name}.json").write_text(json.dumps(data) + "\n", encoding="utf-8")


def load_state_objects(objects: dict, folder: Path) -> None:
    """Every object's state read and checked against the object first, then loaded: all of them or none."""
    states = {}
    for name, obj in objects.items():
        path, tensor_path = folder / f"{name}.json", folder / f"{name}.safetensors"
        try:
            tensors = load_file(str(tensor_path)) if tensor_path.is_file() else {}
            state = join_tensors(json.loads(path.read_text(encoding="utf-8")), tensors)
        except Exception as err:  # json, safetensors' own error type, a missing tensor
            raise CheckpointError(f"{path} cannot be read: {err}") from None
        missing = sorted(set(obj.state_dict()) - set(state)) if isinstance(state, dict) else "all"
        if missing:
            raise CheckpointError(f"{path} does not fit this run's {name}: keys missing: {missing}")
        states[name] = state
    for name, obj in objects.items():
        obj.load_state_dict(states[name])


def process_state_names(process_objects: dict, world_size: int) -> list[str]:
    """The file names (less ``.json``) of objects every process keeps its own of: ``NAME_RANK``."""
    return [f"{name}_{rank}" for name in process_objects for rank in range(world_size)]


def register_checkpoint_hooks(accelerator, model, objects: dict, adapter_only: bool, process_objects=None) -> None:
    """What ``save_state``/``load_state`` do beyond Accelerate's own files: ``objects`` (name: an object with
    ``state_dict``/``load_state_dict``, such as the scheduler) kept as JSON and safetensors, never pickled, and
    ``process_objects`` likewise, one file per process (``NAME_RANK``: a streamed loader's position); the
    weights of the prepared ``model`` kept whole, or with PEFT only the adapter (the frozen base is loaded from
    base_model again), every key checked when loading."""
    rank = accelerator.process_index
    own = {f"{name}_{rank}": obj for name, obj in (process_objects or {}).items()}

    def save_files(models, weights, folder):
        if weights:
            weights[0] = checkpoint_state_dict(unwrap_model(models[0], accelerator), adapter_only)
        if accelerator.is_main_process:
            save_state_objects(objects, Path(folder))
        save_state_objects(own, Path(folder))

    def load_files(models, folder):
        load_state_objects(objects, Path(folder))
        load_state_objects(own, Path(folder))
        if models:
            load_checkpoint_weights(unwrap_model(models[0], accelerator), Path(folder), adapter_only)
            models.clear()

    accelerator.register_save_state_pre_hook(save_files)
    accelerator.register_load_state_pre_hook(load_files)
    SAVE_SIZES[accelerator] = lambda: checkpoint_bytes(model, adapter_only)


def finalize_checkpoint(staging: Path, final: Path, state: dict) -> None:
    """Write ``trainer_state.json`` last, then flush the folder to disk and rename it into place (until the rename
    it is a ``.tmp-`` folder, which is never taken for a checkpoint)."""
    write_text_atomic(staging / STATE_NAME, json.dumps(state, indent=2) + "\n")
    publish_dir(staging, final, aside=final.with_name(f"{TMP_PREFIX}{final.name}.old"))


def rotate_checkpoints(output_dir: Path, newest: Path, limit: int, keep: str | None = None) -> None:
    """Keep ``newest`` and at most ``limit`` complete checkpoints in all (0: keep all), and the checkpoint named
    ``keep`` (model selection's best) beside them.

    Checkpoints at later steps than ``newest`` come from a run this one replaced (started afresh, or resumed from
    an earlier checkpoint): they are removed so that ``latest`` always means the last save.
    """
    found = complete_checkpoints(output_dir)
    newest_step = read_trainer_state(newest)["global_step"]
    others = [(step, folder) for step, folder in found if folder.resolve() != newest.resolve() and folder.name != keep]
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


def save_checkpoint(
    accelerator, output_dir: Path, record: dict, save_total_limit: int, keep: str | None = None
) -> Path:
    """Everything needed to continue exactly (``record`` is the run's ``trainer_state.json``), staged in a
    temporary folder that is renamed into place once complete; then older checkpoints are rotated out (never
    ``keep``, the best one of model selection).

    A full disk removes the staging folder and leaves the checkpoints before it as they were.
    """
    step = record["global_step"]
    staging, final = output_dir / f"{TMP_PREFIX}{step}", output_dir / checkpoint_name(step)
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    estimate = SAVE_SIZES[accelerator]

    def needed() -> tuple[int, str]:
        return estimate(), "the weights it keeps and AdamW's two float32 moments per trainable weight"

    try:
        with disk_full_guard(output_dir, final.name, needed, remove=staging):
            accelerator.save_state(str(staging))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                finalize_checkpoint(staging, final, record)
    except DiskFullError as err:
        found = complete_checkpoints(output_dir)
        if not found:
            raise
        raise DiskFullError(
            f"{err} The checkpoints before it are untouched: --resume_from_checkpoint latest continues from "
            f"{found[-1][1]}."
        ) from err
    if accelerator.is_main_process:
        rotate_checkpoints(output_dir, final, save_total_limit, keep=keep)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def check_random_states_restored(folder: Path, rank: int) -> None:
    """Accelerate only logs a random-state file that fails to load or to apply; resuming without those states
    would not continue the run exactly, so that is an error here."""
    path = Path(folder) / f"random_states_{rank}.pkl"
    states = load_torch_file(path)
    # Python's, numpy's, torch's, then the GPU's are set in turn: the first and the third restored mean the second.
    saved = states.get("torch_manual_seed") if isinstance(states, dict) else None
    restored = isinstance(saved, torch.Tensor) and torch.equal(torch.get_rng_state(), saved)
    if not (restored and random.getstate() == states.get("random_state")):
        raise broken_checkpoint(folder, f"{path}: its random states could not be restored (wrong content)")


def load_checkpoint(accelerator, folder: Path) -> None:
    """``accelerator.load_state`` (after :func:`check_checkpoint_files`): a model that did not load completely, or
    random states that were not restored, never train."""
    try:
        accelerator.load_state(str(folder))
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"cannot resume from {folder}: {type(err).__name__}: {err}") from err
    check_random_states_restored(folder, accelerator.process_index)
