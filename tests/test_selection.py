"""Model selection and early stopping (issue 15, part 1): the best checkpoint survives rotation and resume and is
the final model; early stopping fires after exactly ``patience`` evaluations without improvement.

The evaluations return scripted metrics (the training itself is real), so which step is best is known.
"""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import manifest, model_dir, read_metrics  # noqa: F401 (fixtures)

import orpo.train.loop
from orpo.config import TrainConfig
from orpo.loss.objective import LOSS_TYPES, Objective
from orpo.loss.orpo import ORPO_METRIC_NAMES, orpo_loss
from orpo.loss.pairs import COMPARABLE_METRIC_NAMES
from orpo.train.loop import train
from orpo.train.selection import GREATER_IS_BETTER, ModelSelection, greater_is_better


def config(model_dir, manifest, output_dir, **overrides) -> TrainConfig:
    values = dict(
        base_model=str(model_dir),
        train_data=str(manifest),
        test_data=str(manifest),
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=2,
        logging_steps=1,
        eval_steps=1,
        save_steps=1,
        save_total_limit=1,
        load_best_model_at_end=True,
        report_to=[],
    )
    return TrainConfig(**{**values, **overrides})


def script_evaluations(monkeypatch, wers: list[float], signal_at: int | None = None) -> list[int]:
    """Each evaluation returns the next WER of ``wers``; ``signal_at``: raise SIGTERM in that evaluation (1-based).
    Returns the steps evaluated, in order."""
    steps = []

    def evaluate(self, tag="tuned", compare_beams=False, stop=None):
        steps.append(self.state.global_step)
        if len(steps) == signal_at:
            signal.raise_signal(signal.SIGTERM)
        return {"eval/wer": wers[len(steps) - 1], "eval/loss": 1.0}

    monkeypatch.setattr(orpo.train.loop.ORPOTrainer, "evaluate", evaluate)
    return steps


def final_weights_equal(output_dir, checkpoint) -> bool:
    """The final model's weights (Hugging Face names) are the checkpoint's (ORPOWhisper's ``whisper.`` names)."""
    final = load_file(str(output_dir / "model.safetensors"))
    saved = {name.removeprefix("whisper."): t for name, t in load_file(str(checkpoint / "model.safetensors")).items()}
    common = set(final) & set(saved)
    assert len(common) > 0.9 * len(final)
    return all(torch.equal(final[name], saved[name]) for name in common)


def test_best_checkpoint_survives_rotation_and_is_the_final_model(model_dir, manifest, tmp_path, monkeypatch):  # noqa: F811
    output_dir = tmp_path / "run"
    # steps 1, 2, 3, the final evaluation (4), then the best model evaluated again as the final one
    steps = script_evaluations(monkeypatch, [0.5, 0.2, 0.4, 0.45, 0.2])
    train(config(model_dir, manifest, output_dir))
    assert steps == [1, 2, 3, 4, 4]
    checkpoints = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-3"]  # save_total_limit 1: the newest, and the best beside it
    best = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())["best"]
    assert (best["metric"], best["value"], best["step"], best["checkpoint"]) == ("eval/wer", 0.2, 2, "checkpoint-2")
    assert final_weights_equal(output_dir, output_dir / "checkpoint-2")
    assert not final_weights_equal(output_dir, output_dir / "checkpoint-3")
    assert json.loads((output_dir / "eval_results.json").read_text())["best_model"]["step"] == 2


def test_the_final_weights_stay_when_they_are_the_best(model_dir, manifest, tmp_path, monkeypatch):  # noqa: F811
    output_dir = tmp_path / "run"
    steps = script_evaluations(monkeypatch, [0.5, 0.4, 0.3, 0.1])
    train(config(model_dir, manifest, output_dir))
    assert steps == [1, 2, 3, 4]  # no second final evaluation
    best = json.loads((output_dir / "eval_results.json").read_text())["best_model"]
    assert (best["step"], best["checkpoint"]) == (4, None)


@pytest.mark.parametrize(
    "wers, threshold, stop_step", [([0.5, 0.4, 0.45, 0.41, 0.3], 0.0, 4), ([0.5, 0.47, 0.46, 0.1], 0.05, 3)]
)
def test_early_stopping_fires_after_exactly_patience_evaluations(
    model_dir,
    manifest,
    tmp_path,
    monkeypatch,
    caplog,
    wers,
    threshold,
    stop_step,  # noqa: F811
):
    output_dir = tmp_path / "run"
    steps = script_evaluations(monkeypatch, wers + [0.9] * 10)
    cfg = config(
        model_dir,
        manifest,
        output_dir,
        max_steps=10,
        early_stopping_patience=2,
        early_stopping_threshold=threshold,
        load_best_model_at_end=False,
    )
    train(cfg)
    trained = [r["step"] for r in read_metrics(output_dir) if "loss" in r]
    assert trained[-1] == stop_step and steps[:stop_step] == list(range(1, stop_step + 1))
    assert (output_dir / f"checkpoint-{stop_step}" / "trainer_state.json").is_file()
    assert any(f"early stopping at step {stop_step}" in r.getMessage() for r in caplog.records)
    assert json.loads((output_dir / "eval_results.json").read_text())["early_stopped"].startswith("early stopping")


def test_a_resumed_run_knows_the_best_so_far(model_dir, manifest, tmp_path, monkeypatch):  # noqa: F811
    output_dir = tmp_path / "run"
    script_evaluations(monkeypatch, [0.2, 0.5], signal_at=1)  # SIGTERM during step 1: the run stops after step 2
    assert train(config(model_dir, manifest, output_dir)) == {}
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    steps = script_evaluations(monkeypatch, [0.4, 0.6, 0.2])  # steps 3, 4 (final), the best again
    train(config(model_dir, manifest, output_dir, resume_from_checkpoint="latest"))
    assert steps == [3, 4, 4]
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    assert final_weights_equal(output_dir, output_dir / "checkpoint-1")
    assert json.loads((output_dir / "eval_results.json").read_text())["best_model"]["step"] == 1


def test_every_logged_preference_metric_has_a_known_direction():
    _, per_clip = orpo_loss(
        torch.tensor([-1.0]), torch.tensor([[-2.0]]), torch.tensor([[True]]), torch.tensor([1.0]), alpha=0.1
    )
    assert set(per_clip) == set(ORPO_METRIC_NAMES)
    logged = {"eval/wer", "eval/cer"} | {f"eval/{name}" for name in COMPARABLE_METRIC_NAMES}
    for loss_type in LOSS_TYPES:  # ORPO's names include every other objective's
        logged |= {f"eval/{name}" for name in Objective(loss_type).metric_names}
    assert set(GREATER_IS_BETTER) == logged
    cfg = TrainConfig(test_data="t.jsonl", eval_steps=1, save_steps=1, load_best_model_at_end=True)
    assert greater_is_better(cfg, "eval/wer") is False and greater_is_better(cfg, "eval/rewards/accuracies") is True
    cfg.greater_is_better = True
    assert greater_is_better(cfg, "eval/wer") is True


def test_improvement_needs_more_than_the_threshold_and_nan_never_improves():
    cfg = TrainConfig(
        test_data="t.jsonl", eval_steps=1, save_steps=1, early_stopping_patience=3, early_stopping_threshold=0.1
    )
    selection = ModelSelection(cfg, uses_cer=False)
    assert selection.name == "eval/wer"
    assert selection.update(1, {"eval/wer": 0.5}, "checkpoint-1")
    assert not selection.update(2, {"eval/wer": 0.45}, "checkpoint-2")  # better, but by less than 0.1
    assert not selection.update(3, {"eval/wer": math.nan}, "checkpoint-3")
    assert selection.update(4, {"eval/wer": 0.3}, "checkpoint-4")
    assert selection.best.evaluations_without_improvement == 0 and selection.best.step == 4
    assert ModelSelection(cfg, uses_cer=True).name == "eval/cer"


def test_with_lora_the_best_adapter_is_the_saved_one(model_dir, manifest, tmp_path, monkeypatch):  # noqa: F811
    output_dir = tmp_path / "run"
    script_evaluations(monkeypatch, [0.5, 0.2, 0.4, 0.45, 0.2])
    train(config(model_dir, manifest, output_dir, peft="lora", lora_r=4, learning_rate=1e-2))
    adapter = load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))
    for step, same in ((2, True), (3, False)):
        saved = load_file(str(output_dir / f"checkpoint-{step}" / "model.safetensors"))
        lora = {
            name.removeprefix("whisper.").replace(".default", ""): t for name, t in saved.items() if "lora_" in name
        }
        assert set(lora) == set(adapter)
        assert all(torch.equal(adapter[name], lora[name]) for name in adapter) is same, step
