"""Training end to end on a tiny random Whisper: it learns the preference, saves, and reloads."""

from pathlib import Path

import pytest
import torch
from conftest import write_manifest
from safetensors.torch import load_file
from trainer_helpers import read_metrics
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from orpo.config import TrainConfig
from orpo.data.collate import PreferenceCollator
from orpo.data.dataset import PreferenceDataset
from orpo.data.manifest import read_manifest
from orpo.data.tokens import WhisperTokens
from orpo.loss.orpo import orpo_loss
from orpo.model.orpo_whisper import ORPOWhisper
from orpo.train.loop import train


def preference_metrics(model_dir: Path, manifest: Path, alpha: float = 1.0) -> dict[str, float]:
    """Mean rewards/margins and rewards/accuracies of a saved model on a manifest, computed directly."""
    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    tokens = WhisperTokens(processor.tokenizer, True, "transcribe", False, 448)
    dataset = PreferenceDataset(read_manifest(manifest), processor.feature_extractor, tokens, None, 0, 30)
    batch = PreferenceCollator(tokens.eot)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        out = ORPOWhisper(model)(batch)
        _, per_clip = orpo_loss(
            out["logps_chosen"], out["logps_rejected"], out["rejected_mask"], out["nll_chosen"], alpha
        )
    return {name: values.mean().item() for name, values in per_clip.items()}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """30 optimizer steps of full fine-tuning on 8 clips, evaluated on the same clips."""
    folder = tmp_path_factory.mktemp("train")
    manifest = write_manifest(folder / "data", count=8)
    cfg = TrainConfig(
        base_model=str(tiny_model_dir),
        train_data=str(manifest),
        test_data=str(manifest),
        output_dir=str(folder / "out"),
        learning_rate=1e-3,
        max_steps=30,
        warmup_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        logging_steps=5,
        eval_steps=15,
        alpha=1.0,
        report_to=["tensorboard"],
    )
    results = train(cfg)
    return cfg, manifest, Path(cfg.output_dir), results


def test_training_raises_margins_and_accuracies(trained, tiny_model_dir):
    _, manifest, output_dir, _ = trained
    before = preference_metrics(tiny_model_dir, manifest)
    after = preference_metrics(output_dir, manifest)
    assert after["rewards/margins"] > before["rewards/margins"] + 0.01
    assert after["rewards/accuracies"] > before["rewards/accuracies"]
    assert after["rewards/accuracies"] == 1.0
    assert after["nll_loss"] < before["nll_loss"]


def test_metrics_are_logged_with_trl_names(trained):
    _, _, output_dir, results = trained
    records = read_metrics(output_dir)
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [5, 10, 15, 20, 25, 30]
    for name in (
        "nll_loss",
        "log_odds_ratio",
        "log_odds_chosen",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "learning_rate",
    ):
        assert name in records[0]
    eval_steps = [r["step"] for r in records if "eval/loss" in r]
    assert eval_steps == [15, 30]
    assert results == {k: v for k, v in records[-1].items() if k != "step"}
    assert list(output_dir.glob("whisper-orpo/*/events.out.tfevents.*")), "no TensorBoard event file"


def test_saved_model_round_trips(trained, tiny_model_dir):
    cfg, manifest, output_dir, results = trained
    assert (output_dir / "model.safetensors").is_file()
    assert not list(output_dir.glob("*.bin"))
    assert not (output_dir / ".final-model.tmp").exists()
    reloaded = WhisperForConditionalGeneration.from_pretrained(output_dir)
    assert reloaded.proj_out.weight.data_ptr() == reloaded.model.decoder.embed_tokens.weight.data_ptr()
    base = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert not torch.equal(reloaded.model.decoder.layers[0].fc1.weight, base.model.decoder.layers[0].fc1.weight)
    stored = load_file(output_dir / "model.safetensors")
    state = reloaded.state_dict()
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name
    # The reloaded model scores the data exactly as the trained one did in its final evaluation.
    again = preference_metrics(output_dir, manifest)
    assert again["rewards/margins"] == pytest.approx(results["eval/rewards/margins"], rel=1e-4, abs=1e-7)
    assert again["loss"] == pytest.approx(results["eval/loss"], rel=1e-5)
    WhisperProcessor.from_pretrained(output_dir)
    assert (output_dir / "config.yaml").is_file()


def test_lora_saves_adapter_and_merged_model(tiny_model_dir, tmp_path):
    from peft import PeftModel

    manifest = write_manifest(tmp_path / "data", count=4)
    output_dir = tmp_path / "out"
    cfg = TrainConfig(
        base_model=str(tiny_model_dir),
        train_data=str(manifest),
        output_dir=str(output_dir),
        peft="lora",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        learning_rate=1e-2,
        max_steps=3,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to=[],
    )
    train(cfg)
    merged = WhisperForConditionalGeneration.from_pretrained(output_dir)
    assert not any("lora" in name for name in merged.state_dict())
    assert (output_dir / "adapter" / "adapter_model.safetensors").is_file()
    base = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, output_dir / "adapter").merge_and_unload()
    layer = "model.encoder.layers.0.fc1.weight"
    assert not torch.equal(
        merged.state_dict()[layer], WhisperForConditionalGeneration.from_pretrained(tiny_model_dir).state_dict()[layer]
    ), "LoRA did not change the encoder"
    for name, tensor in merged.state_dict().items():
        assert torch.allclose(with_adapter.state_dict()[name], tensor, atol=1e-6), name
