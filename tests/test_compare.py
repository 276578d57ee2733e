"""The closing quality table: base and tuned, greedy and beam search, and the alpha-0 baseline trained with
the same recipe; checked on a tiny random model against direct evaluations of the saved models."""

from __future__ import annotations

import json

import pytest
import torch
from trainer_helpers import manifest, model_dir  # noqa: F401  (fixtures)

from orpo.config import TrainConfig
from orpo.errors import ConfigError
from orpo.eval.report import format_quality_table, quality_rows
from orpo.train.compare import SFT_FOLDER, train_and_compare


def recipe(model_dir, manifest, output_dir, **overrides) -> TrainConfig:
    settings = dict(
        base_model=str(model_dir),
        train_data=str(manifest),
        test_data=str(manifest),
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        eval_before_train=True,
        generation_max_length=8,
        report_to=[],
        compare_num_beams=2,
        compare_sft=True,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_the_table_holds_five_rows_that_match_the_runs(model_dir, manifest, tmp_path, capsys):  # noqa: F811
    output_dir = tmp_path / "run"
    results = train_and_compare(recipe(model_dir, manifest, output_dir))
    record = json.loads((output_dir / "eval_results.json").read_text())
    rows = record["quality_table"]
    assert [(r["model"], r["decoding"]) for r in rows] == [
        ("base", "greedy"),
        ("base", "beam 2"),
        ("ORPO (alpha 0.1)", "greedy"),
        ("ORPO (alpha 0.1)", "beam 2"),
        ("plain fine-tuning (alpha 0)", "greedy"),
    ]
    base = record["base_metrics"]
    assert rows[0]["wer"] == base["eval/wer"] and rows[1]["wer"] == base["eval/wer_beam2"]
    assert rows[2]["wer"] == results["eval/wer"] and rows[3]["wer"] == results["eval/wer_beam2"]
    assert rows[2]["logp_margin"] == pytest.approx(results["eval/logps/chosen"] - results["eval/logps/rejected"])
    sft = json.loads((output_dir / SFT_FOLDER / "eval_results.json").read_text())["metrics"]
    assert rows[4]["wer"] == sft["eval/wer"] and rows[4]["preference_accuracy"] == sft["eval/preference/accuracy"]
    # ORPO's own accuracy and margin are the comparable ones (both from the average log-probs)
    assert sft["eval/preference/accuracy"] == pytest.approx(sft["eval/rewards/accuracies"])
    assert results["eval/preference/margin"] == pytest.approx(results["eval/rewards/margins"] / 0.1)
    sft_config = (output_dir / SFT_FOLDER / "config.yaml").read_text()
    assert "alpha: 0.0" in sft_config and "max_steps: 3" in sft_config and "seed: 42" in sft_config
    # Two different trainings: with alpha 0 the odds-ratio term is gone, so the weights differ.
    from safetensors.torch import load_file

    orpo_weights = load_file(output_dir / "model.safetensors")
    sft_weights = load_file(output_dir / SFT_FOLDER / "model.safetensors")
    name = "model.decoder.layers.0.fc1.weight"
    assert not torch.equal(orpo_weights[name], sft_weights[name])
    printed = capsys.readouterr().out
    assert "| plain fine-tuning (alpha 0) |   greedy |" in printed and "beam 2" in printed
    assert record["quality_table_text"] == format_quality_table(rows).splitlines()


def test_rows_without_a_base_evaluation_or_baseline():
    tuned = {"eval/wer": 0.25, "eval/preference/accuracy": 0.75, "eval/preference/margin": 1.5}
    rows = quality_rows(None, tuned, None, tuned_name="SimPO (beta 2, gamma 0.5)", beams=0)
    assert [(r["model"], r["wer"], r["preference_accuracy"], r["logp_margin"]) for r in rows] == [
        ("base", None, None, None),
        ("SimPO (beta 2, gamma 0.5)", 0.25, 0.75, 1.5),
    ]
    table = format_quality_table(rows)
    assert "| base" in table and "25.00%" in table and "1.5000" in table


def test_comparisons_need_test_data():
    with pytest.raises(ConfigError, match="set test_data"):
        TrainConfig(train_data="x.jsonl", compare_sft=True)
