"""Two processes (DDP over gloo on CPU) follow the loss trajectory of one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, write_manifest

pytestmark = pytest.mark.slow

# Float tolerance between the runs: the same arithmetic, but the batch is split and the gradients are
# averaged by an all-reduce, which can change the summation order (seen here: equal to the last digit).
RELATIVE_TOLERANCE = 1e-5


def launch(output_dir: Path, processes: int, batch_size: int, model_dir: Path, manifest: Path) -> list[dict]:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    command += ["--multi_gpu"] if processes > 1 else []
    command += [
        "--main_process_port",
        "29517",
        str(ROOT / "train.py"),
        "--base_model",
        str(model_dir),
        "--train_data",
        str(manifest),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        str(batch_size),
        "--logging_steps",
        "1",
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--seed",
        "3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"processes: {processes}," in result.stderr, "the run did not report the expected world size"
    if processes > 1:
        assert "distributed: MULTI_CPU" in result.stderr or "distributed: MULTI_GPU" in result.stderr
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_follow_single_process_trajectory(tiny_model_dir, tmp_path):
    manifest = write_manifest(tmp_path / "data", count=8)
    single = launch(tmp_path / "one", 1, 4, tiny_model_dir, manifest)
    double = launch(tmp_path / "two", 2, 2, tiny_model_dir, manifest)
    assert [r["step"] for r in single] == [r["step"] for r in double] == list(range(1, 7))
    for one, two in zip(single, double):
        for name in ("loss", "nll_loss", "rewards/margins", "logps/rejected"):
            assert two[name] == pytest.approx(one[name], rel=RELATIVE_TOLERANCE, abs=1e-7), (one["step"], name)
    # Training moved the model: the trajectory is not flat, so the comparison above means something.
    assert single[-1]["loss"] < single[0]["loss"]
