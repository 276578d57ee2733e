"""Scaling out: DeepSpeed ZeRO-2/3 (and offload), multi-node launch, and the recipe/launch-config checks.

Fast tests check the shipped configs, the start-up checks, the memory table and the SLURM template.
The slow ones launch real runs on CPU processes over gloo (DeepSpeed falls back to its CPU accelerator):
DDP, ZeRO-2, ZeRO-3 and ZeRO-3 with offload follow the loss trajectory of one process with the same
global batch; the ZeRO-3 model is saved whole (tied head included) and a ZeRO-3 checkpoint resumes the
same trajectory; two "machines" on one host run the multi-node config; tests/zero3_worker.py checks
ZeRO-3 gradients, generation with ranks of different lengths, and PEFT adapters from inside a run.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, write_manifest

from orpo.config import TrainConfig, parse_args
from orpo.errors import ConfigError
from orpo.scale.checks import check_launch_config
from orpo.scale.launch import accelerator_device_kwargs, launch_prefix
from orpo.scale.memory import MODEL_PARAMETERS, memory_table, model_state_bytes
from orpo.scale.zero3 import fill_deepspeed_config, generation_kwargs, param_ndim, peft_model_kwargs
from orpo.train.checkpoint import check_checkpoint_files

DS_CONFIGS = {
    "zero2": ROOT / "ds_configs" / "zero2.json",
    "zero3": ROOT / "ds_configs" / "zero3.json",
    "zero3_offload": ROOT / "ds_configs" / "zero3_offload.json",
}
LAUNCH_CONFIGS = {
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
    "zero3_offload": "deepspeed_zero3_offload.yaml",
    "multi_node": "multi_node_zero3.yaml",
}


def ds_env(json_path: Path, world_size: int = 2, **extra) -> dict:
    """The environment `accelerate launch` gives a DeepSpeed run with a deepspeed_config_file."""
    return {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(json_path),
        "ACCELERATE_MIXED_PRECISION": "no",
        "WORLD_SIZE": str(world_size),
        **extra,
    }


def write_ds_config(tmp_path: Path, base: str = "zero2", **changes) -> Path:
    config = json.loads(DS_CONFIGS[base].read_text())
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / f"{base}-edited.json"
    path.write_text(json.dumps(config))
    return path


# --------------------------------------------------------------------------------------------------
# The shipped configs


@pytest.mark.parametrize("name", sorted(DS_CONFIGS))
def test_shipped_deepspeed_configs_take_the_recipe_values(name):
    config = json.loads(DS_CONFIGS[name].read_text())
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "train_batch_size",
    ):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
    assert "optimizer" not in config and "scheduler" not in config  # the trainer builds AdamW and the schedule
    zero = config["zero_optimization"]
    assert zero["stage"] == (2 if name == "zero2" else 3)
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    if name == "zero3_offload":
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    else:
        assert "offload_optimizer" not in zero and "offload_param" not in zero


@pytest.mark.parametrize("name", sorted(LAUNCH_CONFIGS))
def test_accelerate_configs_point_at_a_deepspeed_config(name):
    config = yaml.safe_load((ROOT / "accelerate_configs" / LAUNCH_CONFIGS[name]).read_text())
    assert config["distributed_type"] == "DEEPSPEED"
    assert "mixed_precision" not in config  # accelerate refuses it beside deepspeed_config_file
    ds_file = ROOT / config["deepspeed_config"]["deepspeed_config_file"]
    assert ds_file.is_file() and ds_file.parent.name == "ds_configs"
    stage = json.loads(ds_file.read_text())["zero_optimization"]["stage"]
    assert stage == (2 if name == "zero2" else 3)
    if name == "multi_node":
        assert config["num_machines"] == 2 and config["num_processes"] % config["num_machines"] == 0
        assert config["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"  # torchrun per machine
        assert config["main_process_ip"] and config["main_process_port"]
    else:
        assert config["num_machines"] == 1


@pytest.mark.parametrize("name", sorted(DS_CONFIGS))
@pytest.mark.parametrize("recipe", [None, "recipes/demo.yaml", "recipes/whisper-large-v3/orpo-full/config.yaml"])
def test_shipped_configs_pass_the_start_up_check(name, recipe):
    argv = ["--config", str(ROOT / recipe)] if recipe else []
    cfg = parse_args(argv)
    check_launch_config(cfg, env=ds_env(DS_CONFIGS[name], world_size=8))


# --------------------------------------------------------------------------------------------------
# Contradictions between the recipe and the launch configuration stop the run


CONTRADICTIONS = [
    # (DeepSpeed JSON changes, recipe values, words the error must contain)
    ({"bf16__enabled": True}, {"mixed_precision": "fp16"}, ["mixed_precision", "bf16.enabled"]),
    ({"fp16__enabled": True}, {"mixed_precision": "bf16"}, ["mixed_precision", "fp16.enabled"]),
    ({"bf16__enabled": True}, {"mixed_precision": "no"}, ["mixed_precision", "bf16.enabled"]),
    (
        {"train_micro_batch_size_per_gpu": 8},
        {"per_device_train_batch_size": 4},
        ["per_device_train_batch_size", "train_micro_batch_size_per_gpu"],
    ),
    ({"gradient_accumulation_steps": 4}, {"gradient_accumulation_steps": 2}, ["gradient_accumulation_steps"]),
    ({"gradient_clipping": 1.0}, {"max_grad_norm": 0.3}, ["max_grad_norm", "gradient_clipping"]),
    ({"train_batch_size": 64}, {"per_device_train_batch_size": 4}, ["train_batch_size", "16 clips"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}, {}, ["'optimizer' section"]),
    ({"scheduler": {"type": "WarmupLR"}}, {}, ["'scheduler' section"]),
]


@pytest.mark.parametrize("changes, recipe, words", CONTRADICTIONS)
def test_contradictions_name_both_files_and_the_key(tmp_path, changes, recipe, words):
    ds_path = write_ds_config(tmp_path, **changes)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    argv = ["--config", str(recipe_path)]
    with pytest.raises(ConfigError) as err:
        check_launch_config(parse_args(argv), env=ds_env(ds_path, world_size=4))
    message = str(err.value)
    assert str(ds_path) in message
    if recipe:
        assert str(recipe_path) in message
    for word in words:
        assert word in message


def test_matching_numbers_in_the_deepspeed_config_are_accepted(tmp_path):
    ds_path = write_ds_config(
        tmp_path,
        train_micro_batch_size_per_gpu=4,
        gradient_accumulation_steps=2,
        gradient_clipping=0.5,
        train_batch_size=32,
        bf16__enabled=True,
    )
    cfg = TrainConfig(
        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.5, mixed_precision="bf16"
    )
    check_launch_config(cfg, env=ds_env(ds_path, world_size=4))


def test_a_command_line_override_is_named_as_the_source(tmp_path):
    ds_path = write_ds_config(tmp_path, gradient_clipping=1.0)
    argv = ["--config", str(ROOT / "recipes" / "demo.yaml"), "--max_grad_norm", "0.25"]
    with pytest.raises(ConfigError, match=r"command line \(--max_grad_norm\): max_grad_norm is 0.25"):
        check_launch_config(parse_args(argv), env=ds_env(ds_path))


@pytest.mark.parametrize("key", ["load_in_8bit", "load_in_4bit"])
def test_quantised_loading_is_refused_under_zero3_only(key):
    cfg = TrainConfig(peft="lora", **{key: True})
    with pytest.raises(
        ConfigError, match=f"{key} is true, but DeepSpeed config .*zero3.json: zero_optimization.stage is 3"
    ):
        check_launch_config(cfg, env=ds_env(DS_CONFIGS["zero3"]))
    check_launch_config(cfg, env=ds_env(DS_CONFIGS["zero2"]))  # LoRA on 8-/4-bit: ZeRO-2 is fine
    check_launch_config(cfg, env={"WORLD_SIZE": "2"})  # and so is DDP


def test_adalora_is_refused_under_deepspeed():
    with pytest.raises(ConfigError, match="peft is 'adalora'"):
        check_launch_config(TrainConfig(peft="adalora"), env=ds_env(DS_CONFIGS["zero2"]))


def test_gradient_checkpointing_is_fine_under_zero3():
    check_launch_config(TrainConfig(gradient_checkpointing=True), env=ds_env(DS_CONFIGS["zero3"]))


def test_zero3_without_16bit_gather_is_refused(tmp_path):
    ds_path = write_ds_config(
        tmp_path, base="zero3", zero_optimization__stage3_gather_16bit_weights_on_model_save=False
    )
    with pytest.raises(ConfigError, match="stage3_gather_16bit_weights_on_model_save must be true"):
        check_launch_config(TrainConfig(), env=ds_env(ds_path))


def test_launch_precision_must_agree_with_the_recipe():
    env = {"ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "2"}
    with pytest.raises(ConfigError, match="mixed_precision is 'no', but the accelerate launch configuration"):
        check_launch_config(TrainConfig(mixed_precision="no"), env=env)
    check_launch_config(TrainConfig(mixed_precision="bf16"), env=env)


def test_several_problems_are_reported_together(tmp_path):
    ds_path = write_ds_config(tmp_path, base="zero3", gradient_clipping=2.0, bf16__enabled=True)
    with pytest.raises(ConfigError) as err:
        check_launch_config(TrainConfig(load_in_8bit=True, peft="lora"), env=ds_env(ds_path))
    message = str(err.value)
    for word in ("gradient_clipping", "bf16.enabled", "load_in_8bit"):
        assert word in message


def test_a_missing_deepspeed_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_launch_config(TrainConfig(), env=ds_env(tmp_path / "nope.json"))


def test_launch_flags_without_a_file_are_checked_too():
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_GRADIENT_CLIPPING": "1.0",
        "WORLD_SIZE": "2",
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
    }
    with pytest.raises(ConfigError, match="gradient_clipping is 1.0"):
        check_launch_config(TrainConfig(max_grad_norm=0.5), env=env)


# --------------------------------------------------------------------------------------------------
# Helpers the trainer calls


def fake_accelerator(ds_config: dict | None, processes: int = 2):
    plugin = SimpleNamespace(deepspeed_config=ds_config) if ds_config is not None else None
    return SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=plugin, num_processes=processes), num_processes=processes
    )


def test_auto_values_are_filled_from_the_recipe_not_accelerate_defaults():
    from transformers import WhisperConfig

    ds = json.loads(DS_CONFIGS["zero3"].read_text())
    cfg = TrainConfig(per_device_train_batch_size=3, gradient_accumulation_steps=5, max_grad_norm=0.25)
    fill_deepspeed_config(fake_accelerator(ds, processes=4), cfg, WhisperConfig(d_model=1280))
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 60
    assert ds["gradient_clipping"] == 0.25  # Accelerate alone would put 1.0 here
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1280 * 1280
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 1280 * 1280)
    assert zero["stage3_param_persistence_threshold"] == 12800
    assert ds["bf16"]["enabled"] == "auto"  # the Accelerator fills precision from the recipe's mixed_precision
    assert fill_deepspeed_config(fake_accelerator(None), cfg, WhisperConfig()) is None


def test_generation_is_synced_under_zero3_with_several_processes():
    zero = lambda stage: {"zero_optimization": {"stage": stage}}  # noqa: E731
    assert generation_kwargs(fake_accelerator(zero(3), 2)) == {"synced_gpus": True}
    assert generation_kwargs(fake_accelerator(zero(3), 1)) == {"synced_gpus": False}
    assert generation_kwargs(fake_accelerator(zero(2), 8)) == {"synced_gpus": False}
    assert generation_kwargs(fake_accelerator(None, 8)) == {"synced_gpus": False}
    assert peft_model_kwargs(fake_accelerator(zero(3), 2)) == {"autocast_adapter_dtype": False}
    assert peft_model_kwargs(fake_accelerator(zero(2), 2)) == {}


def test_launch_prefix_relaunches_the_same_way():
    assert launch_prefix(1, env={}) == "python"
    assert (
        launch_prefix(2, env={"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
        == "accelerate launch --multi_gpu --num_processes 2"
    )
    deepspeed = ds_env(Path("ds_configs/zero3.json"), world_size=1)
    assert (
        launch_prefix(1, env=deepspeed)
        == "accelerate launch --use_deepspeed --deepspeed_config_file ds_configs/zero3.json --num_processes 1"
    )
    two_machines = {
        **ds_env(Path("ds_configs/zero3.json"), world_size=16),
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    assert launch_prefix(16, env=two_machines).endswith(
        "--num_processes 16 --num_machines 2 --machine_rank MACHINE_RANK --main_process_ip 10.0.0.1 "
        "--main_process_port 29500"
    )


def test_device_settings_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accelerator_device_kwargs({}) == {"cpu": True, "kwargs_handlers": []}
    ddp = accelerator_device_kwargs({"WORLD_SIZE": "2"})
    assert ddp["cpu"] is True and ddp["kwargs_handlers"][0].backend == "gloo"
    deepspeed = accelerator_device_kwargs({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"})
    assert deepspeed["cpu"] is False and deepspeed["kwargs_handlers"][0].backend == "gloo"  # cpu=True skips DeepSpeed


def test_param_ndim_sees_through_a_zero3_placeholder():
    import torch

    weight = torch.nn.Parameter(torch.empty(0))
    weight.ds_shape = torch.Size([1280, 1280])
    assert param_ndim(weight) == 2
    assert param_ndim(torch.nn.Parameter(torch.ones(3))) == 1


def test_deepspeed_checkpoint_files_are_checked(tmp_path):
    import torch

    from orpo.errors import CheckpointError

    with pytest.raises(CheckpointError, match="pytorch_model/"):
        check_checkpoint_files(tmp_path, 2, ["scheduler"], scaler=False, deepspeed=True)
    engine = tmp_path / "pytorch_model"
    engine.mkdir()
    for name in (
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "random_states_0.pkl",
        "random_states_1.pkl",
    ):
        torch.save({}, engine / name if name.endswith(".pt") else tmp_path / name)
    (tmp_path / "scheduler.json").write_text("{}")
    check_checkpoint_files(tmp_path, 2, ["scheduler"], scaler=False, deepspeed=True)
    with pytest.raises(CheckpointError, match="adalora_state.json missing"):
        check_checkpoint_files(tmp_path, 2, ["scheduler", "adalora_state"], scaler=False, deepspeed=True)
    with pytest.raises(CheckpointError, match="optimizer shards of 2 processes; this run has 4"):
        check_checkpoint_files(tmp_path, 4, ["scheduler"], scaler=False, deepspeed=True)


# --------------------------------------------------------------------------------------------------
# Memory per GPU (the model-state table of docs/scaling.md, and the README's per-recipe column, come from this code)


def test_model_state_memory_follows_the_zero_paper():
    n = 1e9
    assert model_state_bytes(n, 8, "ddp")["gpu"] == 16 * n
    assert model_state_bytes(n, 8, "zero2")["gpu"] == 2 * n + 14 * n / 8
    assert model_state_bytes(n, 8, "zero3")["gpu"] == 16 * n / 8
    assert model_state_bytes(n, 8, "zero3_offload") == {"gpu": 0.0, "cpu": 16 * n / 8}
    assert model_state_bytes(n, 1, "zero3")["gpu"] == model_state_bytes(n, 1, "ddp")["gpu"]


def test_memory_cli_prints_the_table_in_the_docs():
    result = subprocess.run(
        [sys.executable, "-m", "orpo.distributed", "--memory", "large-v3", "--gpus", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| large-v3 | 1,550M | 23.10 GiB | 5.41 GiB | 2.89 GiB | layers in use / 2.89 GiB |" in result.stdout
    scaling = (ROOT / "docs" / "scaling.md").read_text()
    assert memory_table(list(MODEL_PARAMETERS), 8) in scaling, (
        "docs/scaling.md's model-state table differs from `python -m orpo.distributed --gpus 8`: paste the new output"
    )
    readme = (ROOT / "README.md").read_text()
    assert "(docs/scaling.md" in readme, "the README no longer links docs/scaling.md"
    # The README's requirements table quotes the one-GPU full fine-tune figure of each model (DDP column).
    for line in memory_table(list(MODEL_PARAMETERS), 1).splitlines()[2:]:
        model, parameters, one_gpu = (cell.strip() for cell in line.strip("|").split("|")[:3])
        row = rf"^\| {re.escape(model)} \| {re.escape(parameters)} \|.*\| {re.escape(one_gpu)} \|$"
        assert re.search(row, readme, re.M), (
            f"README's GPU memory table lacks {model} ({parameters}) at {one_gpu}: `whisper-orpo memory --gpus 1`"
        )


# --------------------------------------------------------------------------------------------------
# The SLURM template


def test_slurm_template_builds_the_rendezvous_from_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-node-a\\ngpu-node-b\\n'\n")
    # srun: run the task once per node, as SLURM would, with that node's SLURM_NODEID.
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        'for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@" || exit 1; done\n'
    )
    (bin_dir / "accelerate").write_text('#!/bin/bash\nprintf \'%s\\n\' "$@" > "$RECORD_DIR/node-$SLURM_NODEID"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD_DIR": str(tmp_path),
        "SLURM_JOB_NODELIST": "gpu-node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "RESUME": "1",
    }
    result = subprocess.run(
        ["bash", str(ROOT / "examples" / "slurm" / "train.sbatch"), "recipes/demo.yaml", "--max_steps", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for node in (0, 1):
        args = (tmp_path / f"node-{node}").read_text().split("\n")

        def value(flag, args=args):
            return args[args.index(flag) + 1]

        assert value("--config_file") == "accelerate_configs/multi_node_zero3.yaml"
        assert value("--num_machines") == "2" and value("--num_processes") == "8"
        assert value("--machine_rank") == str(node)
        assert value("--main_process_ip") == "gpu-node-a" and value("--main_process_port") == "29500"
        assert args[args.index("train.py") : -1] == [
            "train.py",
            "--config",
            "recipes/demo.yaml",
            "--max_steps",
            "3",
            "--resume_from_checkpoint",
            "latest",
        ]


# --------------------------------------------------------------------------------------------------
# Launched runs (CPU processes over gloo)

# Same arithmetic, the batch split over processes and the gradients averaged by collectives: the sums run
# in another order. Seen here: losses equal to ~1e-8 relative, margins (a difference of two close numbers)
# to ~1e-7 absolute, DeepSpeed's gradient norm to ~1e-4 relative.
RELATIVE_TOLERANCE, ABSOLUTE_TOLERANCE = 1e-5, 1e-6
STEPS, GLOBAL_BATCH, MAX_GRAD_NORM = 4, 4, 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def train_args(model_dir: Path, data: Path, output_dir: Path, batch: int) -> list[str]:
    return [
        str(ROOT / "train.py"),
        "--base_model",
        str(model_dir),
        "--train_data",
        str(data / "train.jsonl"),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(STEPS),
        "--per_device_train_batch_size",
        str(batch),
        "--logging_steps",
        "1",
        "--learning_rate",
        "1e-3",
        "--max_grad_norm",
        str(MAX_GRAD_NORM),
        "--report_to",
        "none",
        "--seed",
        "3",
    ]


def accelerate_command(
    config: str, processes: int, machines: int = 1, machine_rank: int = 0, port: int | None = None
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / config),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(port or free_port()),
    ]
    if machines > 1:
        command += [
            "--num_machines",
            str(machines),
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            "127.0.0.1",
        ]
    return command


def run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return result


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


TRAJECTORY_METRICS = ("loss", "nll_loss", "rewards/margins", "logps/chosen", "logps/rejected", "learning_rate")


def assert_same_trajectory(reference: list[dict], other: list[dict], steps=None, orpo: bool = True) -> None:
    """The same per-step metrics (``orpo``: ORPO's log-odds ratio too) and gradient norms."""
    other_by_step = {r["step"]: r for r in other if "loss" in r}
    steps = steps or [r["step"] for r in reference if "loss" in r]
    assert sorted(other_by_step) == sorted(steps)
    for one in (r for r in reference if r["step"] in steps and "loss" in r):
        two = other_by_step[one["step"]]
        for name in TRAJECTORY_METRICS + (("log_odds_ratio",) if orpo else ()):
            assert two[name] == pytest.approx(one[name], rel=RELATIVE_TOLERANCE, abs=ABSOLUTE_TOLERANCE), (
                one["step"],
                name,
            )
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3), (one["step"], "grad_norm")


def deepspeed_config_of_checkpoint(folder: Path) -> dict:
    import torch

    states = sorted(glob.glob(str(folder / "pytorch_model" / "*model_states.pt")))
    assert states, f"no DeepSpeed model states in {folder}"
    return torch.load(states[0], map_location="cpu", weights_only=False)["ds_config"]


@pytest.fixture(scope="module")
def deepspeed_available():
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed: pip install -e '.[deepspeed]'")


@pytest.fixture(scope="module")
def ds_data(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("ds-data")
    write_manifest(folder, count=8)
    write_manifest(folder, count=5, name="test.jsonl")  # 5 test clips: the 2 processes get uneven shards
    return folder


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_model_dir, ds_data, deepspeed_available):
    output_dir = tmp_path_factory.mktemp("single") / "out"
    run([sys.executable] + train_args(tiny_model_dir, ds_data, output_dir, GLOBAL_BATCH))
    return output_dir


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_model_dir, ds_data, deepspeed_available):
    output_dir = tmp_path_factory.mktemp("zero3") / "out"
    result = run(
        accelerate_command("deepspeed_zero3.yaml", 2)
        + train_args(tiny_model_dir, ds_data, output_dir, 2)
        + ["--save_steps", "2", "--test_data", str(ds_data / "test.jsonl"), "--generation_max_length", "12"]
    )
    assert "processes: 2, distributed: DEEPSPEED" in result.stderr
    return output_dir


LAUNCHES = {"ddp": "cpu_2proc.yaml", "zero2": "deepspeed_zero2.yaml", "zero3_offload": "deepspeed_zero3_offload.yaml"}


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "zero2", "zero3", "zero3_offload"])
def test_two_processes_follow_the_single_process_trajectory(
    launch, single_run, zero3_run, tiny_model_dir, ds_data, tmp_path
):
    if launch == "zero3":
        output_dir = zero3_run
    else:
        output_dir = tmp_path / "out"
        extra = ["--save_steps", "2"] if launch != "ddp" else []
        result = run(
            accelerate_command(LAUNCHES[launch], 2) + train_args(tiny_model_dir, ds_data, output_dir, 2) + extra
        )
        kind = "MULTI_CPU" if launch == "ddp" else "DEEPSPEED"
        assert f"processes: 2, distributed: {kind}" in result.stderr
    reference = metrics(single_run)
    assert_same_trajectory(reference, metrics(output_dir))
    assert reference[-1]["loss"] < reference[0]["loss"]  # training moved the model: the comparison means something
    if launch != "ddp":
        ds_config = deepspeed_config_of_checkpoint(output_dir / "checkpoint-2")
        assert ds_config["zero_optimization"]["stage"] == (2 if launch == "zero2" else 3)
        assert ds_config["gradient_clipping"] == MAX_GRAD_NORM  # from the recipe, not Accelerate's default 1.0
        assert ds_config["train_micro_batch_size_per_gpu"] == 2 and ds_config["train_batch_size"] == GLOBAL_BATCH


@pytest.mark.slow
def test_zero3_saves_one_whole_hugging_face_model(zero3_run, single_run):
    import torch
    from transformers import WhisperForConditionalGeneration

    tuned = WhisperForConditionalGeneration.from_pretrained(zero3_run)
    reference = WhisperForConditionalGeneration.from_pretrained(single_run)
    assert tuned.proj_out.weight.data_ptr() == tuned.model.decoder.embed_tokens.weight.data_ptr()  # tied
    expected = reference.state_dict()
    for name, tensor in tuned.state_dict().items():
        assert tensor.shape == expected[name].shape, name
        assert torch.allclose(tensor, expected[name], atol=1e-5), name
    evaluation = [r for r in metrics(zero3_run) if "eval/loss" in r]
    # The evaluation at the end ran on 2 processes over 5 clips, generated transcripts (WER) included.
    assert len(evaluation) == 1 and evaluation[0]["step"] == STEPS and "eval/wer" in evaluation[0]


@pytest.mark.slow
def test_zero3_checkpoint_resumes_the_same_trajectory(zero3_run, tiny_model_dir, ds_data, tmp_path):
    output_dir = tmp_path / "resumed"
    checkpoint = zero3_run / "checkpoint-2"
    assert sorted(p.name for p in (checkpoint / "pytorch_model").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    result = run(
        accelerate_command("deepspeed_zero3.yaml", 2)
        + train_args(tiny_model_dir, ds_data, output_dir, 2)
        + ["--resume_from_checkpoint", str(checkpoint)]
    )
    assert "resumed from" in result.stderr
    assert_same_trajectory(metrics(zero3_run), metrics(output_dir), steps=[3, 4])


@pytest.mark.slow
def test_two_machines_on_one_host_run_the_multi_node_config(single_run, tiny_model_dir, ds_data, tmp_path):
    output_dir = tmp_path / "out"
    port = free_port()
    logs = [tmp_path / f"machine-{rank}.log" for rank in (0, 1)]
    # Output to files, not pipes: a launch blocked on a full pipe would stall the other one in a collective.
    launches = []
    for rank, log in zip((0, 1), logs):
        with log.open("w") as sink:
            launches.append(
                subprocess.Popen(
                    accelerate_command("multi_node_zero3.yaml", 2, machines=2, machine_rank=rank, port=port)
                    + train_args(tiny_model_dir, ds_data, output_dir, 2),
                    cwd=ROOT,
                    env=run_env(),
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
            )
    deadline = time.monotonic() + 300
    try:
        for launch in launches:
            launch.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for launch in launches:
            if launch.poll() is None:  # the launcher and its training processes
                os.killpg(launch.pid, signal.SIGKILL)
                launch.wait()
    outputs = [log.read_text() for log in logs]
    for launch, output in zip(launches, outputs):
        assert launch.returncode == 0, output[-6000:]
    # One process per launch, one world of two: the main process reports it.
    assert "processes: 2, distributed: DEEPSPEED" in outputs[0]
    assert_same_trajectory(metrics(single_run), metrics(output_dir))
    assert (output_dir / "model.safetensors").is_file()


def run_worker(mode: str, tiny_model_dir: Path, ds_data: Path, out_dir: Path) -> dict:
    run(
        accelerate_command("deepspeed_zero3.yaml", 2)
        + [
            str(ROOT / "tests" / "zero3_worker.py"),
            mode,
            str(tiny_model_dir),
            str(ds_data / "train.jsonl"),
            str(ds_data / "test.jsonl"),
            str(out_dir),
        ]
    )
    return json.loads((out_dir / f"{mode}.json").read_text())


@pytest.mark.slow
def test_zero3_gradients_match_and_generation_finishes_on_uneven_ranks(
    deepspeed_available, tiny_model_dir, ds_data, tmp_path
):
    result = run_worker("full", tiny_model_dir, ds_data, tmp_path)
    assert result["world_size"] == 2 and result["zero_stage"] == 3
    assert result["proj_out_partitioned"]  # the tied head/embedding is really sharded
    # ORPO gradients with the head inside checkpointed chunks (and gradient checkpointing): all non-zero, equal.
    assert result["grad_params"] > 50 and result["grad_zero"] == []
    assert result["grad_max_rel_diff"] < 1e-4
    assert result["head_grad_norm"] == pytest.approx(result["head_grad_norm_reference"], rel=1e-5)
    assert result["head_grad_norm"] > 0
    # generate under ZeRO-3: ranks decoding 3 and 9 new tokens both finish, with the unpartitioned model's tokens.
    assert result["generation_kwargs"] == {"synced_gpus": True}
    assert result["generated_lengths"][0] != result["generated_lengths"][1]
    assert result["generation_matches_reference"]
    assert result["transcribed_clips"] == result["test_clips"] == 5


@pytest.mark.slow
def test_zero3_peft_adapter_is_saved_whole(deepspeed_available, tiny_model_dir, ds_data, tmp_path):
    result = run_worker("peft", tiny_model_dir, ds_data, tmp_path)
    assert result["world_size"] == 2 and result["zero_stage"] == 3
    assert result["adapter_tensors"] > 0 and result["adapter_missing"] == 0
    assert result["lora_B_nonzero"]  # one optimizer step moved the adapters away from their zero init
    assert result["adapter_max_abs_diff"] == 0.0  # the saved adapter is the live (gathered) one
    assert result["merged_max_abs_diff"] < 1e-6 and result["merged_tied"]


@pytest.mark.slow
def test_a_contradiction_stops_the_launch_before_any_weights_load(
    deepspeed_available, tiny_model_dir, ds_data, tmp_path
):
    ds_path = write_ds_config(tmp_path, gradient_clipping=1.0)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--use_deepspeed",
        "--deepspeed_config_file",
        str(ds_path),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
    ]
    result = subprocess.run(
        command + train_args(tiny_model_dir, ds_data, tmp_path / "out", 2),
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert (
        f"max_grad_norm is {MAX_GRAD_NORM}, but DeepSpeed config {ds_path}: gradient_clipping is 1.0" in result.stderr
    )
    assert "Loading weights" not in result.stderr


@pytest.mark.slow
def test_zero3_selects_the_single_process_best_and_saves_its_gathered_weights(
    deepspeed_available, tiny_model_dir, ds_data, tmp_path
):
    """Model selection under ZeRO-3: the all-process metric picks the same best checkpoint as one process does,
    and the final model is that checkpoint's gathered weights. Asking for the lowest margin (they grow as the model
    trains) makes an early checkpoint the best, so its DeepSpeed state is loaded back at the end."""
    import torch
    from transformers import WhisperForConditionalGeneration

    selection = ["--test_data", str(ds_data / "test.jsonl"), "--eval_steps", "1", "--save_steps", "1"]
    selection += ["--save_total_limit", "1", "--load_best_model_at_end", "true", "--generation_max_length", "8"]
    selection += ["--metric_for_best_model", "eval/rewards/margins", "--greater_is_better", "false"]
    single, zero3 = tmp_path / "single", tmp_path / "zero3"
    run([sys.executable] + train_args(tiny_model_dir, ds_data, single, GLOBAL_BATCH) + selection)
    run(accelerate_command("deepspeed_zero3.yaml", 2) + train_args(tiny_model_dir, ds_data, zero3, 2) + selection)
    best = [json.loads((folder / "eval_results.json").read_text())["best_model"] for folder in (single, zero3)]
    assert best[0]["checkpoint"] is not None and best[0]["step"] < STEPS, best[0]
    assert (best[1]["step"], best[1]["checkpoint"]) == (best[0]["step"], best[0]["checkpoint"])
    tuned = WhisperForConditionalGeneration.from_pretrained(zero3).state_dict()
    reference = WhisperForConditionalGeneration.from_pretrained(single).state_dict()
    for name, tensor in tuned.items():
        assert torch.allclose(tensor, reference[name], atol=1e-5), name
