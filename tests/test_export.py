"""orpo/export.py: merged Hugging Face models from a model dir, an adapter dir or a training checkpoint; CTranslate2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, write_clip, write_manifest

from orpo.artifacts.run_model import describe, load_model
from orpo.data.audio import SAMPLE_RATE, load_audio
from orpo.errors import ExportError
from orpo.export import main


def state_of(model_dir) -> dict[str, torch.Tensor]:
    from transformers import WhisperForConditionalGeneration

    model = (
        model_dir
        if isinstance(model_dir, torch.nn.Module)
        else WhisperForConditionalGeneration.from_pretrained(model_dir)
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol: float = 0.0):
    assert set(a) == set(b)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name


def save_adapter(base_dir: Path, folder: Path, seed: int = 0, init_lora_weights=True) -> torch.nn.Module:
    """A LoRA adapter over ``base_dir`` with non-zero weights, saved with PEFT; returns the merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(seed)
    model = get_peft_model(
        WhisperForConditionalGeneration.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "fc1"]),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return model


def write_run_config(output_dir: Path, **settings) -> None:
    import yaml

    from orpo.config import TrainConfig, config_to_dict

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(TrainConfig(**settings)), sort_keys=False))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Output folders as a training run leaves them, made directly (no training): quick to build.

    ``none``: a final output_dir (full fine-tune) with a state-dict checkpoint-1 (accelerator.save_state's
    model.safetensors of the ORPOWhisper: keys "whisper.*", the tied proj_out left out);
    ``lora``: a final output_dir with adapter/ and an adapter-only checkpoint-1 (the trainer's layout).
    """
    from safetensors.torch import save_file
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from orpo.model.orpo_whisper import ORPOWhisper
    from orpo.train.checkpoint import checkpoint_state_dict

    folder = tmp_path_factory.mktemp("export-runs")
    processor = WhisperProcessor.from_pretrained(tiny_model_dir)
    out = {}

    run = folder / "out-none"
    write_run_config(run, base_model=str(tiny_model_dir))
    torch.manual_seed(1)
    tuned = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tuned.save_pretrained(run)
    processor.save_pretrained(run)
    with torch.no_grad():  # the checkpoint: weights half-way between base and tuned
        base = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
        for p, q in zip(base.parameters(), tuned.parameters()):
            p.copy_((p + q) / 2)
    state = {k: v for k, v in ORPOWhisper(base).state_dict().items() if k != "whisper.proj_out.weight"}
    (run / "checkpoint-1").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, run / "checkpoint-1" / "model.safetensors")
    (run / "checkpoint-1" / "trainer_state.json").write_text(
        json.dumps({"global_step": 1, "epoch": 0, "step_in_epoch": 1, "settings": {"base_model": str(tiny_model_dir)}})
    )
    out["none"], out["none-checkpoint-weights"] = run, {k.removeprefix("whisper."): v for k, v in state.items()}

    run = folder / "out-lora"
    write_run_config(
        run,
        base_model=str(tiny_model_dir),
        peft="lora",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj", "fc1"],
    )
    adapter_model = save_adapter(tiny_model_dir, run / "adapter", seed=2)
    checkpoint_model = save_adapter(tiny_model_dir, folder / "scratch-adapter", seed=3)
    (run / "checkpoint-1").mkdir()
    save_file(
        {k: v.contiguous() for k, v in checkpoint_state_dict(ORPOWhisper(checkpoint_model), True).items()},
        run / "checkpoint-1" / "model.safetensors",
    )
    (run / "checkpoint-1" / "trainer_state.json").write_text(
        json.dumps({"global_step": 1, "epoch": 0, "step_in_epoch": 1, "total_steps": 2})
    )
    merged = adapter_model.merge_and_unload()
    merged.save_pretrained(run)
    processor.save_pretrained(run)
    out["lora"], out["lora-checkpoint-merged"] = run, state_of(checkpoint_model.merge_and_unload())
    return out


@pytest.fixture(scope="module")
def trained_runs(runs):
    return runs


def test_describe_kinds(trained_runs, tmp_path):
    assert describe(trained_runs["none"]) == "model"
    assert describe(trained_runs["lora"] / "adapter") == "adapter"
    assert describe(trained_runs["none"] / "checkpoint-1") == "checkpoint"
    with pytest.raises(ExportError, match="holds no model"):
        describe(tmp_path)


def test_export_of_a_final_output_dir_works_with_the_asr_pipeline(trained_runs, tmp_path, capsys):
    from transformers import pipeline

    out = tmp_path / "exported"
    assert main(["--checkpoint", str(trained_runs["none"]), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    for name in ("preprocessor_config.json", "tokenizer.json", "normalizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert_same_weights(state_of(out), state_of(trained_runs["none"]))

    asr = pipeline("automatic-speech-recognition", model=str(out))
    audio = load_audio(write_clip(tmp_path / "clip.wav", 1.0, seed=1))
    result = asr({"raw": audio, "sampling_rate": SAMPLE_RATE}, generate_kwargs={"max_new_tokens": 5})
    assert isinstance(result["text"], str)

    from transformers import WhisperProcessor

    assert WhisperProcessor.from_pretrained(out).tokenizer.normalize("The colour") == "the color"


def test_export_refuses_to_overwrite(trained_runs, tmp_path, capsys):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["--checkpoint", str(trained_runs["none"]), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--checkpoint", str(trained_runs["none"]), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_export_of_an_adapter_dir_equals_the_merged_final_model(trained_runs, tmp_path):
    run = trained_runs["lora"]
    whisper, processor, source = load_model(run / "adapter")
    assert source.startswith("adapter")
    # The final output_dir holds the same adapter merged by the trainer.
    assert_same_weights(state_of(whisper), state_of(run), atol=1e-6)
    assert not any("lora" in k for k in whisper.state_dict())


def check_full_checkpoint(checkpoint: Path, tiny_model_dir, final_dir: Path) -> dict:
    from safetensors.torch import load_file

    whisper, _, source = load_model(checkpoint)  # the base model comes from the checkpoint's own record
    assert source.startswith("checkpoint") and str(tiny_model_dir) in source
    weights = state_of(whisper)
    base, final = state_of(tiny_model_dir), state_of(final_dir)
    layer = "model.decoder.layers.0.fc1.weight"
    assert not torch.equal(weights[layer], base[layer]) and not torch.equal(weights[layer], final[layer])
    assert whisper.proj_out.weight.data_ptr() == whisper.model.decoder.embed_tokens.weight.data_ptr()
    stored = load_file(checkpoint / "model.safetensors")  # the saved weights are exactly those loaded
    assert len(stored) >= len(weights) - 1
    for key, tensor in stored.items():
        assert torch.equal(weights[key.removeprefix("whisper.")], tensor), key
    return weights


def test_export_of_a_full_checkpoint(trained_runs, tiny_model_dir, tmp_path):
    from transformers import WhisperForConditionalGeneration

    checkpoint = trained_runs["none"] / "checkpoint-1"
    weights = check_full_checkpoint(checkpoint, tiny_model_dir, trained_runs["none"])
    out = tmp_path / "from-checkpoint"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--base_model", str(tiny_model_dir)]) == 0
    assert_same_weights(state_of(WhisperForConditionalGeneration.from_pretrained(out)), weights)


def test_export_of_an_adapter_checkpoint(trained_runs, tiny_model_dir, tmp_path):
    checkpoint = trained_runs["lora"] / "checkpoint-1"
    whisper, _, source = load_model(checkpoint)  # adapters rebuilt from the run's config.yaml
    assert source.startswith("checkpoint")
    weights = state_of(whisper)
    assert_same_weights(weights, trained_runs["lora-checkpoint-merged"], atol=1e-6)
    layer = "model.encoder.layers.0.fc1.weight"
    assert not torch.equal(weights[layer], state_of(trained_runs["lora"])[layer])  # not the final adapter
    assert not any("lora" in k for k in weights)


def test_checkpoint_without_base_model_is_a_clear_error(trained_runs, tmp_path):
    import shutil

    copy = tmp_path / "checkpoint-1"
    shutil.copytree(trained_runs["none"] / "checkpoint-1", copy)
    state = json.loads((copy / "trainer_state.json").read_text())
    state.get("settings", {}).pop("base_model", None)
    (copy / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ExportError, match="--base_model"):
        load_model(copy)


def test_checkpoint_of_another_model_is_a_clear_error(trained_runs, tmp_path):
    from conftest import save_tiny_whisper

    other = save_tiny_whisper(tmp_path / "other", d_model=16)
    with pytest.raises(ExportError, match="does not fit"):
        load_model(trained_runs["none"] / "checkpoint-1", base_model=str(other))


def _ct2_available() -> bool:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return False
    return True


needs_ct2 = pytest.mark.skipif(not _ct2_available(), reason="ctranslate2 is not installed (pip install '.[export]')")


@needs_ct2
def test_ct2_export_of_a_tiny_model_loads_and_matches_transformers(trained_runs, tmp_path, capsys):
    out = tmp_path / "hf"
    clip = write_clip(tmp_path / "clip.wav", 1.0, seed=2)
    assert (
        main(
            [
                "--checkpoint",
                str(trained_runs["none"]),
                "--out",
                str(out),
                "--ct2",
                "float32",
                "--check_audio",
                str(clip),
                "--language",
                "English",
                "--check_max_length",
                "24",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    ct2_dir = tmp_path / "hf_ct2"
    assert (ct2_dir / "model.bin").is_file() and (ct2_dir / "tokenizer.json").is_file()
    assert (ct2_dir / "preprocessor_config.json").is_file()
    # float32: CTranslate2 decodes as transformers does (this random model never stops: compared to the limit)
    assert "same" in printed and "tokens differ" not in printed, printed


@needs_ct2
def test_ct2_int8_export(trained_runs, tmp_path, capsys):
    from transformers import WhisperProcessor

    from orpo.artifacts.export import ct2_greedy, export_ct2
    from orpo.data.tokens import WhisperTokens

    ct2_dir = export_ct2(trained_runs["none"], tmp_path / "int8", "int8")
    processor = WhisperProcessor.from_pretrained(trained_runs["none"])
    prefix = WhisperTokens(processor.tokenizer, True, "transcribe", False, 448).prefix("de")
    assert processor.tokenizer.convert_ids_to_tokens(prefix) == [
        "<|startoftranscript|>",
        "<|de|>",
        "<|transcribe|>",
        "<|notimestamps|>",
    ]
    ids = ct2_greedy(ct2_dir, processor, load_audio(write_clip(tmp_path / "c.wav", 1.0, seed=3)), prefix, max_length=12)
    assert isinstance(ids, list) and len(ids) <= 12
    with pytest.raises(ExportError, match="not empty"):
        export_ct2(trained_runs["none"], ct2_dir, "int8")


@pytest.mark.slow
def test_export_of_real_training_checkpoints(tiny_model_dir, tmp_path):
    """The trainer's own checkpoint-STEP folders (full and LoRA) and final outputs export as they should."""
    from orpo.config import TrainConfig
    from orpo.train.loop import train

    manifest = write_manifest(tmp_path / "data", count=4)
    outputs = {}
    for peft in ("none", "lora"):
        out = tmp_path / f"out-{peft}"
        train(
            TrainConfig(
                base_model=str(tiny_model_dir),
                train_data=str(manifest),
                output_dir=str(out),
                peft=peft,
                lora_r=4,
                lora_alpha=8,
                lora_dropout=0.0,
                learning_rate=1e-2,
                max_steps=2,
                save_steps=1,
                per_device_train_batch_size=2,
                logging_steps=1,
                report_to=[],
            )
        )
        outputs[peft] = out
    check_full_checkpoint(outputs["none"] / "checkpoint-1", tiny_model_dir, outputs["none"])

    merged_final, _, _ = load_model(outputs["lora"] / "adapter")
    assert_same_weights(state_of(merged_final), state_of(outputs["lora"]), atol=1e-6)
    step1, _, source = load_model(outputs["lora"] / "checkpoint-1")
    weights, base = state_of(step1), state_of(tiny_model_dir)
    layer = "model.encoder.layers.0.fc1.weight"
    assert not torch.equal(weights[layer], base[layer])  # the step-1 adapter is merged in
    assert not torch.equal(weights[layer], state_of(outputs["lora"])[layer])  # ... and it is not the final one
    assert torch.equal(weights["model.encoder.layer_norm.weight"], base["model.encoder.layer_norm.weight"])
    out = tmp_path / "exported"
    assert main(["--checkpoint", str(outputs["lora"] / "checkpoint-1"), "--out", str(out)]) == 0
    assert_same_weights(state_of(out), weights)


@pytest.mark.slow
@needs_ct2
def test_tiny_en_exports_to_ct2_and_transcribes_the_demo_clip(tiny_en_dir, tmp_path, capsys):
    """Real Whisper tiny.en: merged HF model + int8 CTranslate2 model, which loads and transcribes correctly."""
    out = tmp_path / "tiny-en"
    clip = ROOT / "examples" / "demo" / "audio" / "test_000.flac"
    assert main(["--checkpoint", str(tiny_en_dir), "--out", str(out), "--ct2", "int8", "--check_audio", str(clip)]) == 0
    printed = capsys.readouterr().out
    assert "ctranslate2:  'The mail usually arrives just before lunch.'" in printed, printed
    assert "transformers: 'The mail usually arrives just before lunch.'" in printed, printed
    import ctranslate2

    model = ctranslate2.models.Whisper(str(tmp_path / "tiny-en_ct2"))
    assert not model.is_multilingual and model.n_mels == 80
