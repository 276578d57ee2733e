"""PEFT on Whisper in this trainer: AdaLoRA prunes ranks, its penalty matches PEFT's, LoRA trains the encoder
with gradient checkpointing, and torch.compile runs with LoRA and checkpointing."""

import json
import time

import pytest
import torch
from trainer_helpers import manifest, model_dir, read_metrics, save_short_window_whisper  # noqa: F401 (fixtures)

import orpo.train.loop as trainer
from orpo.config import TrainConfig
from orpo.data.collate import PreferenceCollator
from orpo.data.dataset import PreferenceDataset
from orpo.data.manifest import read_manifest
from orpo.data.tokens import WhisperTokens
from orpo.model.load import load_processor, load_whisper
from orpo.model.orpo_whisper import ORPOWhisper
from orpo.model.peft import adalora_orthogonal_penalty, adalora_ranks, apply_peft


def config(model_dir, manifest, output_dir, **overrides) -> TrainConfig:
    settings = dict(
        base_model=str(model_dir),
        train_data=str(manifest),
        output_dir=str(output_dir),
        learning_rate=1e-2,
        max_steps=3,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to=[],
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def one_batch(model_dir, manifest) -> dict:
    processor = load_processor(str(model_dir))
    tokens = WhisperTokens(processor.tokenizer, True, "transcribe", False, 448)
    dataset = PreferenceDataset(read_manifest(manifest), processor.feature_extractor, tokens, None, 0, 30)
    return PreferenceCollator(tokens.eot)([dataset[i] for i in range(2)])


def test_adalora_prunes_ranks_and_adds_its_penalty(model_dir, manifest, tmp_path, monkeypatch):
    from peft.tuners.adalora import AdaLoraModel

    calls = []
    real_update = AdaLoraModel.update_and_allocate

    def spy(self, global_step):
        # PEFT reads the gradients here: after optimizer.step(), before zero_grad().
        grads = [p.grad for n, p in self.model.named_parameters() if "lora_E" in n]
        calls.append((global_step, all(g is not None and bool(g.abs().sum() > 0) for g in grads)))
        return real_update(self, global_step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy)
    steps = 8
    cfg = config(
        model_dir,
        manifest,
        tmp_path,
        peft="adalora",
        max_steps=steps,
        adalora_target_r=1,
        adalora_tinit=1,
        adalora_tfinal=2,
        lora_target_modules=["q_proj", "v_proj", "fc1"],
    )
    trainer.train(cfg)
    assert calls == [(step, True) for step in range(steps)]
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (adapter["init_r"], adapter["target_r"], adapter["total_step"]) == (4, 1, steps)
    ranks = {name: sum(mask) for name, mask in adapter["rank_pattern"].items()}
    # q_proj, v_proj, fc1 in 2 encoder layers; q_proj, v_proj (self- and cross-attention), fc1 in 2 decoder layers
    modules = len(ranks)
    assert modules == 2 * 3 + 2 * 5
    # Pruned from 4 per module to a budget of target_r (1) per module on average.
    assert sum(ranks.values()) <= modules * 1 < modules * 4
    assert min(ranks.values()) < 4
    records = read_metrics(tmp_path)
    assert all(r["adalora_orth_reg"] > 0 for r in records)


def test_adalora_penalty_is_the_one_peft_adds(model_dir, manifest):
    """AdaLoraModel.forward adds orth_reg_weight * mean ||PPᵀ - I|| to the loss; ours adds the same amount."""
    cfg = config(model_dir, manifest, "unused", peft="adalora", max_steps=10)
    whisper = apply_peft(load_whisper(cfg, 0), cfg, total_steps=10)
    torch.manual_seed(0)
    for name, p in whisper.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; make the penalty differ from its initial value
            torch.nn.init.normal_(p, std=0.1)
    features = torch.randn(1, 80, 200)
    labels = torch.tensor([[50258, 50259, 50359, 50363, 400, 500, 50257]])
    with_penalty = whisper.base_model(input_features=features, labels=labels).loss  # AdaLoraModel.forward
    without = whisper.base_model.model(input_features=features, labels=labels).loss  # the Whisper model inside
    ours = adalora_orthogonal_penalty(whisper)
    assert ours.item() > 0
    assert (with_penalty - without).item() == pytest.approx(ours.item(), rel=1e-5)
    assert ours.requires_grad
    assert set(adalora_ranks(whisper).values()) == {cfg.lora_r}


def test_lora_trains_the_encoder_with_gradient_checkpointing(model_dir, manifest):
    """peft #617: checkpointed encoder blocks whose inputs do not require grad can leave the encoder's LoRA
    without gradients. The trainer's path (non-reentrant checkpointing) gives them gradients."""
    cfg = config(model_dir, manifest, "unused", peft="lora", gradient_checkpointing=True)
    whisper = apply_peft(load_whisper(cfg, 0), cfg, total_steps=3)
    assert whisper.get_base_model().model.encoder.gradient_checkpointing
    model = ORPOWhisper(whisper).train()
    out = model(one_batch(model_dir, manifest))
    (out["nll_chosen"].mean() - out["logps_rejected"].mean()).backward()
    grads = {name: p.grad for name, p in whisper.named_parameters() if "lora_B" in name}
    encoder = [g for name, g in grads.items() if ".encoder." in name]
    decoder = [g for name, g in grads.items() if ".decoder." in name]
    assert (
        len(encoder) == 2 * 6 and len(decoder) == 2 * 10
    )  # 2 layers x (q, k, v, out, fc1, fc2 [+ cross q, k, v, out])
    assert all(g is not None and g.abs().sum() > 0 for g in encoder + decoder)


# Inductor is left out of the suite: its first compile (C++ kernels) takes minutes on a fresh 2-core
# machine, past the CI budget. aot_eager runs the same Dynamo and AOTAutograd tracing.
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager"])
def test_torch_compile_with_lora_and_gradient_checkpointing(model_dir, manifest, tmp_path, monkeypatch, backend):
    """A few steps with torch_compile on. Inductor's first compile on a 2-core CPU takes minutes (C++ kernels;
    about 14 min cold and 25 s with a warm cache on a busy 2-core machine), aot_eager traces the same graphs
    (Dynamo and AOTAutograd) without generating code (about 40 s)."""
    compiled = []
    real_compile = torch.nn.Module.compile

    def compile_(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return real_compile(self, *args, **({"backend": backend} if backend != "inductor" else {}), **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_)
    cfg = config(
        model_dir,
        manifest,
        tmp_path,
        peft="lora",
        gradient_checkpointing=True,
        torch_compile=True,
        max_steps=2,
        learning_rate=1e-3,
    )
    start = time.perf_counter()
    trainer.train(cfg)
    print(f"torch_compile ({backend}): {time.perf_counter() - start:.1f} s for 2 steps")
    assert sorted(compiled) == ["WhisperDecoder", "WhisperEncoder"]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] == r["loss"] for r in records)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
