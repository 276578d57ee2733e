"""SIGTERM / SIGINT (cluster preemption, Ctrl-C): finish the step, save a checkpoint, exit 0, say how to resume."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, write_manifest
from trainer_helpers import manifest, model_dir, read_metrics, save_short_window_whisper  # noqa: F401 (fixtures)

import orpo.train.loop as trainer
from orpo.config import TrainConfig
from orpo.model.orpo_whisper import ORPOWhisper
from orpo.train.signals import StopSignal

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def wait_for_first_step(process: subprocess.Popen, output_dir: Path, timeout: float = 300) -> None:
    metrics = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"training ended before the first step: {process.communicate()[0][-3000:]}")
        if metrics.is_file() and metrics.read_text().strip():
            return
        time.sleep(0.05)
    process.kill()
    pytest.fail("no training step within the timeout")


def resume_line(output: str) -> str:
    found = re.findall(r"^To resume: (.+)$", output, flags=re.MULTILINE)
    assert found, output[-3000:]
    return found[-1]


def test_second_signal_stops_at_once():
    stop = StopSignal().install()
    try:
        signal.raise_signal(signal.SIGINT)
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the default handler is back: Ctrl-C twice stops at once
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_in_process_saves_and_returns(model_dir, manifest, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_forward = ORPOWhisper.forward

    def forward(self, batch):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 2:
                signal.raise_signal(signal.SIGINT)
        return real_forward(self, batch)

    monkeypatch.setattr(ORPOWhisper, "forward", forward)
    cfg = TrainConfig(
        base_model=str(model_dir),
        train_data=str(manifest),
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to=[],
        learning_rate=1e-3,
    )
    assert trainer.train(cfg) == {}
    assert "Stopped by SIGINT after optimizer step 2 of 5" in capsys.readouterr().out
    assert json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert not (tmp_path / "model.safetensors").exists(), "a stopped run must not write the final model"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "handlers not restored"


@pytest.mark.slow
def test_sigterm_to_train_py_checkpoints_and_the_printed_command_resumes(model_dir, manifest, tmp_path):
    steps = 30
    output_dir = tmp_path / "out"
    command = [
        sys.executable,
        "train.py",
        "--base_model",
        str(model_dir),
        "--train_data",
        str(manifest),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        "2",
        "--logging_steps",
        "1",
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_first_step(process, output_dir)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    stopped = read_metrics(output_dir)[-1]["step"]
    assert 1 <= stopped < steps
    assert f"Stopped by SIGTERM after optimizer step {stopped} of {steps}" in output
    state = json.loads((output_dir / f"checkpoint-{stopped}" / "trainer_state.json").read_text())
    assert state["global_step"] == stopped
    resume = resume_line(output)
    assert resume == (f"python train.py --config {output_dir / 'config.yaml'} --resume_from_checkpoint latest")

    args = shlex.split(resume)
    result = subprocess.run([sys.executable] + args[1:], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(output_dir)] == list(range(1, steps + 1))
    assert (output_dir / "model.safetensors").is_file()
    log = (output_dir / "train.log").read_text()
    assert "SIGTERM received" in log and f"resumed from {output_dir / f'checkpoint-{stopped}'}" in log


def launch_two_processes(args: list[str], port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--multi_gpu",
        "--main_process_port",
        str(port),
        "train.py",
    ] + args
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    """The process id of one rank among the launcher's children (their environment holds RANK)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path("/proc").glob("[0-9]*"):
            try:
                if int((child / "stat").read_text().split()[3]) != launcher.pid:
                    continue
                environ = (child / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child.name)
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} not found")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc")
def test_two_processes_agree_to_stop_and_resume_exactly(model_dir, tmp_path):
    """SIGTERM reaches rank 1 only: both ranks stop after the same step (the stop flag is all-reduced), the
    checkpoint holds both ranks' random states, and the resumed 2-process run follows the uninterrupted one."""
    manifest = write_manifest(tmp_path / "data", count=8)
    steps = 40

    def args(output_dir: Path) -> list[str]:
        return [
            "--base_model",
            str(model_dir),
            "--train_data",
            str(manifest),
            "--output_dir",
            str(output_dir),
            "--max_steps",
            str(steps),
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--logging_steps",
            "1",
            "--learning_rate",
            "1e-3",
            "--report_to",
            "none",
            "--seed",
            "3",
        ]

    uninterrupted = launch_two_processes(args(tmp_path / "A"), 29541)
    output = uninterrupted.communicate(timeout=900)[0]
    assert uninterrupted.returncode == 0, output[-3000:]

    interrupted = launch_two_processes(args(tmp_path / "B"), 29542)
    rank1 = rank_pid(interrupted, 1)
    wait_for_first_step(interrupted, tmp_path / "B")
    os.kill(rank1, signal.SIGTERM)
    output = interrupted.communicate(timeout=300)[0]
    assert interrupted.returncode == 0, output[-3000:]
    stopped = read_metrics(tmp_path / "B")[-1]["step"]
    assert stopped < steps
    assert f"Stopped by a signal on another process after optimizer step {stopped} of {steps}" in output
    checkpoint = tmp_path / "B" / f"checkpoint-{stopped}"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert "accelerate launch --multi_gpu --num_processes 2 train.py" in resume_line(output)

    resumed = launch_two_processes(args(tmp_path / "B") + ["--resume_from_checkpoint", "latest"], 29543)
    output = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, output[-3000:]
    a, b = read_metrics(tmp_path / "A"), read_metrics(tmp_path / "B")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6), x["step"]
