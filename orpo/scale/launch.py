"""The launch environment, and the one place an ``Accelerator`` is built (training and evaluation alike).

Without CUDA (tests, CPU machines) plain DDP needs ``cpu=True`` and gloo; DeepSpeed needs ``cpu=False``
(``cpu=True`` makes Accelerate skip DeepSpeed altogether) and gloo, with which DeepSpeed's CPU accelerator
runs ZeRO-2 and ZeRO-3. DeepSpeed itself is imported only by a DeepSpeed launch.
"""

from __future__ import annotations

import datetime
import os
import shlex
import sys

import torch


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
        flags = (
            ["--deepspeed_config_file", shlex.quote(path)]
            if path != "none"
            else ["--zero_stage", env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")]
        )
        flags = ["--use_deepspeed"] + flags
    elif num_processes == 1:
        return "python"
    else:
        flags = ["--multi_gpu"]
    flags += ["--num_processes", str(num_processes)]
    if machines > 1:
        flags += [
            "--num_machines",
            str(machines),
            "--machine_rank",
            "MACHINE_RANK",
            "--main_process_ip",
            env.get("MASTER_ADDR", "MAIN_IP"),
            "--main_process_port",
            env.get("MASTER_PORT", "29500"),
        ]
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


def accelerate_state():
    """The initialised AcceleratorState, or None (never creates one)."""
    from accelerate.state import AcceleratorState

    return AcceleratorState() if AcceleratorState._shared_state else None


def zero_stage(accelerator=None) -> int:
    """ZeRO stage of the running DeepSpeed engine configuration; 0 without DeepSpeed."""
    state = accelerator.state if accelerator is not None else accelerate_state()
    plugin = getattr(state, "deepspeed_plugin", None) if state is not None else None
    if plugin is None:
        return 0
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def num_processes(accelerator=None) -> int:
    state = accelerator.state if accelerator is not None else accelerate_state()
    return int(getattr(state, "num_processes", 1)) if state is not None else 1


def build_accelerator(
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    log_with=None,
    project_dir: str | None = None,
    data_seed: int | None = None,
):
    """An ``Accelerator`` for this launch (device and process-group backend from :func:`accelerator_device_kwargs`).

    ``data_seed``: the shuffling order of epoch e then depends on seed + e only, so a resumed run sees the
    same batches as an uninterrupted one.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    loader_config = (
        DataLoaderConfiguration(use_seedable_sampler=True, data_seed=data_seed) if data_seed is not None else None
    )
    return Accelerator(
        **accelerator_device_kwargs(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_dir=project_dir,
        dataloader_config=loader_config,
    )


def unwrap_model(model: torch.nn.Module, accelerator=None) -> torch.nn.Module:
    """``model`` out of its DDP / DataParallel wrappers (``Accelerator.unwrap_model`` without DeepSpeed).

    Accelerate's own unwrap imports DeepSpeed whenever it is installed, only to test for its engine, and
    importing DeepSpeed prints "Setting accelerator to ..." and takes seconds. A DeepSpeed engine exists only
    once DeepSpeed is imported, so Accelerate's unwrap is used only then.
    """
    if "deepspeed" in sys.modules:
        if accelerator is not None:
            return accelerator.unwrap_model(model)
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(model)
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


_LONG_WAIT_GROUP = None


def long_wait_group():
    """A gloo process group with a day-long timeout (None in a single process), for a wait as long as one process's
    work takes: all processes wait while the main process checks a large manifest, which the default group's
    timeout (10 minutes with NCCL) would break off. Every process must call it (it makes the group once)."""
    import torch.distributed as dist

    global _LONG_WAIT_GROUP
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if _LONG_WAIT_GROUP is None:
        _LONG_WAIT_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=24))
    return _LONG_WAIT_GROUP


def raise_on_every_process(problem: Exception | None, group, main_only: bool = False) -> None:
    """Every process raises the first error any of them met (``main_only``: the main process's), so none is left
    waiting in the next collective for one that stopped."""
    import torch.distributed as dist

    if group is None:
        if problem is not None:
            raise problem
        return
    if main_only:
        found = [problem]
        dist.broadcast_object_list(found, src=0, group=group)
    else:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, problem, group=group)
    first = next((p for p in found if p is not None), None)
    if first is not None:
        raise first
