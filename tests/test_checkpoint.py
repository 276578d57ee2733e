"""Checkpoints and resume: a run stopped and resumed follows the uninterrupted run step for step.

Run A trains N steps in one go. Run B gets SIGTERM (sent to itself from inside the loss, in-process) during
step k, finishes that step and saves checkpoint-k. Run C resumes B with ``resume_from_checkpoint: latest``
and trains to N. The per-step losses of B+C equal A's. The tiny model has dropout on, so the comparison
also covers the random numbers, and a resumed epoch starts mid-way (``skip_first_batches``).
"""

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import write_manifest
from safetensors.torch import load_file, save_file
from trainer_helpers import read_metrics, save_short_window_whisper

from orpo.config import TrainConfig
from orpo.errors import CheckpointError
from orpo.model.orpo_whisper import ORPOWhisper
from orpo.train.checkpoint import complete_checkpoints, finalize_checkpoint, resolve_checkpoint, rotate_checkpoints
from orpo.train.loop import train

TOLERANCE = 1e-6
STEPS = 6
STOP_AFTER = 3  # with 5 clips, batch 2, 2 micro-batches per step: 2 steps per epoch, so step 3 is mid-epoch


def send_signal_during_micro_batch(monkeypatch, micro_batch: int, signum=signal.SIGTERM) -> None:
    """SIGTERM arrives while training micro-batch number ``micro_batch`` (1-based) is in the forward pass."""
    calls = {"n": 0}
    real_forward = ORPOWhisper.forward

    def forward_then_signal(self, batch):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == micro_batch:
                signal.raise_signal(signum)
        return real_forward(self, batch)

    monkeypatch.setattr(ORPOWhisper, "forward", forward_then_signal)


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> Path:
    return save_short_window_whisper(tmp_path_factory.mktemp("tiny-dropout"), dropout=0.1, attention_dropout=0.1)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> Path:
    return save_short_window_whisper(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("data"), count=5)


def config(model: Path, manifest: Path, output_dir: Path, **overrides) -> TrainConfig:
    settings = dict(
        base_model=str(model),
        train_data=str(manifest),
        output_dir=str(output_dir),
        learning_rate=1e-3,
        max_steps=STEPS,
        warmup_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=1,
        report_to=[],
        seed=5,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def interrupted_and_resumed(model, manifest, root: Path, capsys, **overrides) -> dict:
    """Runs A (uninterrupted), B (SIGTERM during step STOP_AFTER) and C (B resumed from latest)."""
    train(config(model, manifest, root / "A", **overrides))
    mp = pytest.MonkeyPatch()
    try:
        send_signal_during_micro_batch(mp, micro_batch=2 * STOP_AFTER - 1)
        assert train(config(model, manifest, root / "B", **overrides)) == {}
    finally:
        mp.undo()
    stopped_output = capsys.readouterr().out
    checkpoint = root / "B" / f"checkpoint-{STOP_AFTER}"
    kept = root / "kept-checkpoint"
    shutil.copytree(checkpoint, kept)
    metrics_b = read_metrics(root / "B")
    train(config(model, manifest, root / "B", resume_from_checkpoint="latest", **overrides))
    return {"root": root, "checkpoint": kept, "message": stopped_output, "metrics_b": metrics_b}


def assert_same_trace(root: Path) -> None:
    uninterrupted, resumed = read_metrics(root / "A"), read_metrics(root / "B")
    assert [r["step"] for r in uninterrupted] == list(range(1, STEPS + 1))
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), "metrics.jsonl lost or repeated steps"
    for a, b in zip(uninterrupted, resumed):
        for name in ("loss", "nll_loss", "rewards/margins", "learning_rate", "grad_norm"):
            assert b[name] == pytest.approx(a[name], abs=TOLERANCE), (a["step"], name)
    # The trace moved: equal traces mean something.
    assert len({round(r["loss"], 6) for r in uninterrupted}) == STEPS


@pytest.fixture(scope="module")
def full_runs(dropout_model, data, tmp_path_factory):
    capsys = _ModuleCapsys()
    with capsys:
        return interrupted_and_resumed(dropout_model, data, tmp_path_factory.mktemp("resume-full"), capsys)


class _ModuleCapsys:
    """Captures stdout in a module-scoped fixture (pytest's capsys is function-scoped)."""

    def __enter__(self):
        import io
        import sys

        self._stdout, self.buffer = sys.stdout, io.StringIO()
        sys.stdout = self.buffer
        return self

    def __exit__(self, *exc):
        import sys

        sys.stdout = self._stdout

    def readouterr(self):
        class Out:
            out = self.buffer.getvalue()

        self.buffer.seek(0)
        self.buffer.truncate()
        return Out


def test_resumed_run_follows_the_uninterrupted_one(full_runs):
    assert_same_trace(full_runs["root"])
    a = load_file(full_runs["root"] / "A" / "model.safetensors")
    c = load_file(full_runs["root"] / "B" / "model.safetensors")
    for name, tensor in a.items():
        assert torch.allclose(c[name], tensor, atol=1e-6), name


def test_stop_saves_a_checkpoint_and_says_how_to_resume(full_runs):
    root = full_runs["root"]
    assert f"after optimizer step {STOP_AFTER} of {STEPS}" in full_runs["message"]
    assert f"--config {root / 'B' / 'config.yaml'} --resume_from_checkpoint latest" in full_runs["message"]
    assert [r["step"] for r in full_runs["metrics_b"]] == list(range(1, STOP_AFTER + 1))
    state = json.loads((full_runs["checkpoint"] / "trainer_state.json").read_text())
    # 5 clips in batches of 2: 3 batches per epoch, 2 per step; step 3 is the first of epoch 1.
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (STOP_AFTER, 1, 2)
    for name in ("model.safetensors", "optimizer.bin", "scheduler.json", "random_states_0.pkl"):
        assert (full_runs["checkpoint"] / name).is_file(), name
    assert not list(full_runs["checkpoint"].glob("custom_checkpoint_*")), "the scheduler is kept as JSON, not pickled"
    assert not list((root / "B").glob(".tmp-checkpoint-*"))
    log = (root / "B" / "train.log").read_text()
    assert "SIGTERM received" in log and f"resumed from {root / 'B' / f'checkpoint-{STOP_AFTER}'}" in log
    assert log.index("SIGTERM received") < log.index("resumed from"), "train.log was not appended to on resume"


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["lora", "adalora"])
def test_resumed_adapter_run_follows_the_uninterrupted_one(dropout_model, data, tmp_path, capsys, peft):
    extra = {"adalora_tinit": 1, "adalora_tfinal": 1} if peft == "adalora" else {}
    runs = interrupted_and_resumed(dropout_model, data, tmp_path, capsys, peft=peft, **extra)
    assert_same_trace(tmp_path)
    # The checkpoint holds the adapter only: the frozen base model is loaded from base_model again.
    stored = load_file(runs["checkpoint"] / "model.safetensors")
    assert stored and all("lora_" in name or ".ranknum." in name for name in stored), sorted(stored)[:5]
    if peft == "adalora":
        # AdaLoRA's rank allocator (importance averages, rank pattern) lives outside the weights.
        tensors = load_file(runs["checkpoint"] / "adalora_state.safetensors")
        allocator = json.loads((runs["checkpoint"] / "adalora_state.json").read_text())
        assert any(k.startswith("exp_avg_ipt/") for k in tensors) and any(k.startswith("exp_avg_unc/") for k in tensors)
        assert allocator["rank_pattern"]


def test_latest_without_a_checkpoint_is_a_clear_error(plain_model, data, tmp_path):
    cfg = config(plain_model, data, tmp_path / "out", resume_from_checkpoint="latest")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        train(cfg)
    (tmp_path / "out" / "checkpoint-4").mkdir(parents=True)  # a save cut short: no trainer_state.json
    with pytest.raises(
        CheckpointError,
        match=r"no complete checkpoint \(incomplete, without trainer_state.json: "
        r"checkpoint-4\)",
    ):
        train(cfg)


def test_incomplete_or_mismatched_checkpoints_are_clear_errors(full_runs, data, tmp_path):
    model = full_runs["root"] / "A"  # any model of the same shape serves as base_model

    def resume_from(folder: Path, **overrides):
        train(config(model, data, tmp_path / "out", resume_from_checkpoint=str(folder), **overrides))

    no_state = tmp_path / "no-state"
    shutil.copytree(full_runs["checkpoint"], no_state)
    (no_state / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint: it has no trainer_state.json"):
        resume_from(no_state)

    no_optimizer = tmp_path / "no-optimizer"
    shutil.copytree(full_runs["checkpoint"], no_optimizer)
    (no_optimizer / "optimizer.bin").unlink()
    with pytest.raises(CheckpointError, match="incomplete .*: optimizer.bin missing"):
        resume_from(no_optimizer)

    with pytest.raises(CheckpointError, match=r"per_device_train_batch_size 2 -> 1"):
        resume_from(full_runs["checkpoint"], per_device_train_batch_size=1)

    # Weights that do not fit the model: the run stops before training on a half-loaded model.
    wrong_weights = tmp_path / "wrong-weights"
    shutil.copytree(full_runs["checkpoint"], wrong_weights)
    weights = load_file(wrong_weights / "model.safetensors")
    weights.pop("whisper.model.decoder.layers.0.fc1.weight")
    save_file(weights, wrong_weights / "model.safetensors")
    with pytest.raises(CheckpointError, match="(?s)does not fit this model.*fc1"):
        resume_from(wrong_weights)
    assert not (tmp_path / "out" / "model.safetensors").exists()

    assert resolve_checkpoint(str(full_runs["checkpoint"]), tmp_path) == full_runs["checkpoint"]
    with pytest.raises(CheckpointError, match="is not a folder"):
        resolve_checkpoint(str(tmp_path / "nowhere"), tmp_path)


def fake_checkpoint(output_dir: Path, step: int) -> Path:
    staging = output_dir / f".tmp-checkpoint-{step}"
    staging.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, staging / "model.safetensors")  # resolve_checkpoint reads every file
    final = output_dir / f"checkpoint-{step}"
    finalize_checkpoint(staging, final, {"global_step": step, "epoch": 0, "step_in_epoch": step})
    return final


def test_rotation_keeps_the_newest_and_at_most_the_limit(tmp_path):
    for step in (2, 4, 6):
        rotate_checkpoints(tmp_path, fake_checkpoint(tmp_path, step), limit=2)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [4, 6]
    (tmp_path / "checkpoint-99").mkdir()  # incomplete: neither counted nor the newest
    rotate_checkpoints(tmp_path, fake_checkpoint(tmp_path, 8), limit=1)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [8]
    assert resolve_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-8"
    # Directory names are not trusted: the step comes from trainer_state.json.
    (tmp_path / "checkpoint-8").rename(tmp_path / "checkpoint-renamed")
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-renamed"
    # A run resumed from an earlier step replaces the later checkpoints of the run it continues.
    rotate_checkpoints(tmp_path, fake_checkpoint(tmp_path, 5), limit=0)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [5]
    # Saving again at an existing step replaces that checkpoint.
    again = fake_checkpoint(tmp_path, 5)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [5]
    assert not list(tmp_path.glob(".tmp-checkpoint-*")) and again.is_dir()


def test_save_steps_writes_rotated_checkpoints(plain_model, data, tmp_path):
    cfg = config(
        plain_model,
        data,
        tmp_path / "out",
        max_steps=5,
        gradient_accumulation_steps=1,
        save_steps=2,
        save_total_limit=1,
    )
    train(cfg)
    found = complete_checkpoints(tmp_path / "out")
    assert [step for step, _ in found] == [4]
    state = json.loads((found[0][1] / "trainer_state.json").read_text())
    # 5 clips in batches of 2: 3 batches per epoch; step 4 is the first batch of epoch 1.
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (4, 1, 1)
    assert (tmp_path / "out" / "model.safetensors").is_file()
