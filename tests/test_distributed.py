"""Two processes (DDP over gloo on CPU) follow the loss trajectory of one process with the same global batch, and
select the same best model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, write_manifest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# Float tolerance between the runs: the same arithmetic, but the batch is split and the gradients are
# averaged by an all-reduce, which can change the summation order (seen here: equal to the last digit).
RELATIVE_TOLERANCE = 1e-5


def launch(
    output_dir: Path, processes: int, batch_size: int, model_dir: Path, manifest: Path, extra: tuple[str, ...] = ()
) -> list[dict]:
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
        *extra,
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


def test_two_processes_select_the_same_best_step(tiny_model_dir, tmp_path):
    """Model selection on the all-process metric: the same best checkpoint with one process and with two, loaded
    at the end as the final model. The margins grow as the model trains, so asking for the lowest (an inverted
    direction) makes an early checkpoint the best one and the load of its state under DDP is exercised. A
    regression set of 7 clips in two languages (uneven shards) gives the same base-model regression metrics."""
    manifest = write_manifest(tmp_path / "data", count=8)
    clips = [json.loads(line) for line in manifest.read_text().splitlines()][:7]
    regression = tmp_path / "data" / "regression.jsonl"
    regression.write_text(
        "".join(
            json.dumps({**c, "text": c["chosen"], "language": ("English", "German")[i % 2]}) + "\n"
            for i, c in enumerate(clips)
        )
    )
    selection = ("--test_data", str(manifest), "--eval_steps", "1", "--save_steps", "1", "--save_total_limit", "1")
    selection += ("--regression_data", str(regression))
    selection += ("--load_best_model_at_end", "true", "--metric_for_best_model", "eval/rewards/margins")
    selection += ("--greater_is_better", "false", "--generation_max_length", "8")
    best, base = {}, {}
    for processes, batch in ((1, 4), (2, 2)):
        output_dir = tmp_path / f"run{processes}"
        records = launch(output_dir, processes, batch, tiny_model_dir, manifest, selection)
        margins = [r["eval/rewards/margins"] for r in records if "eval/rewards/margins" in r][:6]  # steps 1-6
        best[processes] = json.loads((output_dir / "eval_results.json").read_text())["best_model"]
        base[processes] = {k: v for k, v in records[0].items() if k.startswith("regression/")}
        assert records[0]["step"] == 0 and {"regression/wer/en", "regression/language_accuracy"} <= set(base[processes])
        assert best[processes]["value"] == pytest.approx(min(margins), rel=RELATIVE_TOLERANCE)
        assert best[processes]["checkpoint"] is not None, "the final weights won: nothing was loaded"
        final = load_file(str(output_dir / "model.safetensors"))
        saved = load_file(str(output_dir / best[processes]["checkpoint"] / "model.safetensors"))
        assert all(
            torch.equal(final[name.removeprefix("whisper.")], t)
            for name, t in saved.items()
            if name.removeprefix("whisper.") in final
        )
    assert best[1]["step"] == best[2]["step"] and best[1]["checkpoint"] == best[2]["checkpoint"]
    assert base[1] == base[2]  # every regression clip counted once, whatever the shards
