"""A NaN or Inf loss skips the update and is counted; too many in a row stop the run naming the samples."""

import math
import re

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import manifest, model_dir, read_metrics, save_short_window_whisper  # noqa: F401 (fixtures)

import orpo.model.orpo_whisper
from orpo.config import TrainConfig
from orpo.errors import NonFiniteLossError
from orpo.train.loop import train


def poison(monkeypatch, should_poison) -> dict:
    """Make the chosen log-prob NaN for clips where ``should_poison(sample_index, call)`` holds.

    The NaN enters inside the model's forward, so it flows through the real loss and into the gradients.
    """
    real_forward = orpo.model.orpo_whisper.ORPOWhisper.forward
    seen = {"calls": 0, "poisoned": []}

    def forward(self, batch):
        out = real_forward(self, batch)
        if torch.is_grad_enabled():
            seen["calls"] += 1
            rows = torch.tensor([should_poison(int(i), seen["calls"]) for i in batch["sample_index"]])
            if rows.any():
                seen["poisoned"] += [int(i) for i, r in zip(batch["sample_index"], rows) if r]
                nan = torch.where(rows.to(out["logps_chosen"].device), float("nan"), 0.0)
                out = {**out, "logps_chosen": out["logps_chosen"] + nan}
        return out

    monkeypatch.setattr(orpo.model.orpo_whisper.ORPOWhisper, "forward", forward)
    return seen


def config(model_dir, manifest, output_dir, **overrides):
    settings = dict(
        base_model=str(model_dir),
        train_data=str(manifest),
        output_dir=str(output_dir),
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        max_steps=5,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to=[],
        seed=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_nonfinite_step_is_skipped_and_counted(model_dir, manifest, tmp_path, monkeypatch):
    seen = poison(monkeypatch, lambda index, call: index == 2 and call <= 2)  # clip 2 (line 3), in epoch 0 only
    train(config(model_dir, manifest, tmp_path))
    assert seen["poisoned"] == [2]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    bad = [r["step"] for r in records if "loss" not in r]
    assert len(bad) == 1, records
    (skipped,) = bad
    assert [r["skipped_nonfinite"] for r in records] == [0 if r["step"] < skipped else 1 for r in records]
    # No optimizer or scheduler step on the skipped step: the learning rate does not move.
    if skipped > 1:
        assert records[skipped - 1]["learning_rate"] == records[skipped - 2]["learning_rate"]
    assert records[skipped]["learning_rate"] < records[skipped - 1]["learning_rate"]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    # NaN gradients never reached the weights.
    for name, tensor in load_file(tmp_path / "model.safetensors").items():
        assert torch.isfinite(tensor).all(), name
    log = (tmp_path / "train.log").read_text()
    assert re.search(
        rf"step {skipped}: non-finite loss or gradient, update skipped \(1 in a row, 1 in all\); "
        rf"samples: .*train.jsonl:3\b",
        log,
    ), log


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(model_dir, manifest, tmp_path, monkeypatch):
    poison(monkeypatch, lambda index, call: call >= 2)  # every clip from the second step on
    cfg = config(model_dir, manifest, tmp_path, max_nonfinite_steps=2)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith(
        "step 3: the loss or its gradient was NaN or Inf in 2 optimizer steps in a row (max_nonfinite_steps: 2)"
    )
    sources = re.findall(r"train\.jsonl:(\d+)", message)
    assert len(sources) == 2 and set(sources) <= {"1", "2", "3", "4"}, message
    assert not (tmp_path / "model.safetensors").exists()
    assert "training failed: NonFiniteLossError" in (tmp_path / "train.log").read_text()


def test_max_nonfinite_steps_must_be_positive():
    from orpo.errors import ConfigError

    with pytest.raises(ConfigError, match="max_nonfinite_steps must be >= 1"):
        TrainConfig(max_nonfinite_steps=0)
