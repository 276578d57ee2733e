"""Pair refresh over two processes (DDP, and DeepSpeed ZeRO-3 with its synced generation): each process decodes its
own share of the clips (uneven: 5 clips over 2 processes), every process trains on the same refreshed pairs, and
the run follows the single-process run's pairs and per-step losses."""

from __future__ import annotations

import sys

import pytest
from conftest import write_manifest
from test_deepspeed import (
    GLOBAL_BATCH,
    accelerate_command,
    assert_same_trajectory,
    metrics,
    run,
    train_args,
)

from orpo.train.refresh import pairs_file

pytestmark = pytest.mark.slow

# a refresh after step 2 of 4 decodes 5 of the 8 clips, one clip per generation batch (so the arithmetic
# of each clip's decoding is the same whatever the process)
REFRESH = [
    "--refresh_pairs_steps",
    "2",
    "--refresh_clips",
    "5",
    "--refresh_num_beams",
    "2",
    "--per_device_eval_batch_size",
    "1",
    "--generation_max_length",
    "10",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refresh-data")
    write_manifest(folder, count=8)
    return folder


DPO_LORA = ["--loss_type", "dpo", "--peft", "lora", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"]
DPO_LORA += ["--learning_rate", "1e-2"]  # no dropout: the processes draw other random numbers than one process
SINGLE_RUNS: dict[str, object] = {}


def single(recipe: tuple[str, ...], tmp_path_factory, model_dir, data):
    """The one-process run of a recipe (one per module and recipe)."""
    if recipe not in SINGLE_RUNS:
        output_dir = tmp_path_factory.mktemp("single") / "out"
        run([sys.executable] + train_args(model_dir, data, output_dir, GLOBAL_BATCH) + REFRESH + list(recipe))
        SINGLE_RUNS[recipe] = output_dir
    return SINGLE_RUNS[recipe]


@pytest.mark.parametrize(
    ("launch", "recipe"),
    [("cpu_2proc.yaml", ()), ("deepspeed_zero3.yaml", tuple(DPO_LORA))],
    ids=["ddp", "zero3-dpo-lora"],
)
def test_two_processes_refresh_the_same_pairs_as_one(launch, recipe, tmp_path_factory, tiny_model_dir, data, tmp_path):
    """Under ZeRO-3 with DPO and LoRA the reference log-probs (adapters off) are computed on both processes too."""
    if launch.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed: pip install -e '.[deepspeed]'")
    reference_run = single(recipe, tmp_path_factory, tiny_model_dir, data)
    output_dir = tmp_path / "out"
    command = accelerate_command(launch, 2) + train_args(tiny_model_dir, data, output_dir, 2) + REFRESH + list(recipe)
    result = run(command)
    assert "processes: 2, distributed:" in result.stderr
    assert pairs_file(output_dir, 2).read_text() == pairs_file(reference_run, 2).read_text()
    refreshes = [r for r in metrics(output_dir) if "refresh/clips_decoded" in r]
    assert [(r["step"], r["refresh/clips_decoded"]) for r in refreshes] == [(2, 5.0)]
    assert refreshes[0]["refresh/clips_changed"] > 0
    reference = [r for r in metrics(reference_run) if "refresh/wer" in r]
    assert refreshes[0]["refresh/wer"] == pytest.approx(reference[0]["refresh/wer"])
    # the same pairs on every process: the global losses after the refresh follow the single process's
    assert_same_trajectory(metrics(reference_run), metrics(output_dir), orpo=not recipe)
