"""Checks that need the inside of a ZeRO-3 run; launched by tests/test_deepspeed.py on 2 processes.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 2 \
        tests/zero3_worker.py MODE MODEL_DIR TRAIN_MANIFEST TEST_MANIFEST OUT_DIR

MODE ``full`` (full fine-tune, gradient checkpointing on):
  * the ORPO gradients of one global batch (each rank its half) under ZeRO-3 equal those of the same
    model without DeepSpeed on the whole batch, parameter by parameter (the output head included: it
    is called as a module inside the checkpointed log-prob chunks, so ZeRO-3 gathers its weight for the
    forward and for the recomputation);
  * ``generate`` with ``generation_kwargs(accelerator)`` (synced_gpus) finishes when the ranks decode
    different numbers of tokens, and gives the tokens the unpartitioned model gives;
  * the evaluation's ``generate_transcripts`` finishes on a test set that does not split evenly.
MODE ``peft`` (LoRA, rank 16 so that ZeRO-3 partitions the adapter matrices too): one optimizer step,
then the adapter saved through ``consolidated_whisper`` + ``save_final_model`` reloads equal to the live
(gathered) adapter weights, and the merged model equals base + scale * B @ A.
Rank 0 writes its findings to OUT_DIR/MODE.json.
"""

from __future__ import annotations

import copy
import faulthandler
import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    mode, model_dir, train_manifest, test_manifest, out_dir = sys.argv[1:6]
    # A collective that one rank never joins hangs: dump every thread's stack and exit instead.
    faulthandler.dump_traceback_later(float(os.environ.get("ZERO3_WORKER_TIMEOUT", "240")), exit=True)
    out_dir = Path(out_dir)
    import deepspeed
    from accelerate import Accelerator
    from deepspeed.utils import safe_get_full_grad
    from transformers import GenerationMixin, WhisperConfig

    from orpo.config import TrainConfig
    from orpo.data.collate import PreferenceCollator
    from orpo.data.dataset import build_datasets
    from orpo.loss.orpo import orpo_loss
    from orpo.model.load import load_processor, load_whisper, save_final_model
    from orpo.model.orpo_whisper import ORPOWhisper
    from orpo.model.peft import apply_peft
    from orpo.scale.checks import check_launch_config
    from orpo.scale.launch import accelerator_device_kwargs, zero_stage
    from orpo.scale.zero3 import consolidated_whisper, fill_deepspeed_config, generation_kwargs, whole_model_loading
    from orpo.train.loop import make_optimizer

    peft = mode == "peft"
    cfg = TrainConfig(
        base_model=model_dir,
        train_data=train_manifest,
        test_data=test_manifest,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        gradient_checkpointing=not peft,
        peft="lora" if peft else "none",
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        report_to=[],
        output_dir=str(out_dir),
    )
    check_launch_config(cfg)
    accelerator = Accelerator(mixed_precision="no", **accelerator_device_kwargs())
    rank, world = accelerator.process_index, accelerator.num_processes
    result = {"world_size": world, "zero_stage": zero_stage(accelerator)}

    processor = load_processor(model_dir)
    model_config = WhisperConfig.from_pretrained(model_dir)
    train_set, test_set, tokens = build_datasets(cfg, processor, model_config)
    collate = PreferenceCollator(pad_token_id=tokens.eot)
    torch.manual_seed(0)
    with whole_model_loading(accelerator):
        whisper = load_whisper(cfg, accelerator.local_process_index)
    whisper = apply_peft(whisper, cfg, total_steps=10)
    model = ORPOWhisper(whisper)
    reference = copy.deepcopy(model)  # the same weights, never seen by DeepSpeed
    if not peft:
        reference.whisper.gradient_checkpointing_disable()
    optimizer = make_optimizer(model, cfg)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.per_device_train_batch_size, collate_fn=collate)
    fill_deepspeed_config(accelerator, cfg, model_config)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    engine = model
    partitioned = [n for n, p in engine.module.named_parameters() if getattr(p, "ds_numel", 0) > p.numel()]
    result["partitioned_parameters"] = len(partitioned)
    result["proj_out_partitioned"] = any("embed_tokens" in n or "proj_out" in n for n in partitioned)

    def loss_of(module, batch):
        out = module(batch)
        loss, _ = orpo_loss(
            out["logps_chosen"], out["logps_rejected"], out["rejected_mask"], out["nll_chosen"], cfg.alpha
        )
        return loss

    # This rank's half of the global batch, and the whole batch for the reference.
    global_batch = [train_set[i] for i in range(cfg.per_device_train_batch_size * world)]
    local = collate(global_batch[rank * 2 : rank * 2 + 2])
    whole = collate(global_batch)
    engine.train()
    loss = loss_of(engine, local)

    if not peft:
        engine.backward(loss)
        reference.train()
        loss_of(reference, whole).backward()
        worst, names, zero = 0.0, [], []
        for (name, p), (_, q) in zip(engine.module.named_parameters(), reference.named_parameters()):
            if not p.requires_grad:
                continue
            grad = safe_get_full_grad(p)  # collective under ZeRO-3: every rank calls it, in the same order
            if q.grad is None:
                continue
            names.append(name)
            if grad is None or float(grad.abs().max()) == 0.0:
                zero.append(name)
                continue
            diff = float((grad.float() - q.grad.float()).abs().max() / q.grad.float().abs().max().clamp(min=1e-12))
            worst = max(worst, diff)
        result.update(grad_params=len(names), grad_zero=zero, grad_max_rel_diff=worst)
        head = engine.module.whisper.proj_out.weight
        result["head_grad_norm"] = float(safe_get_full_grad(head).norm())
        result["head_grad_norm_reference"] = float(reference.whisper.proj_out.weight.grad.norm())

        # Generation: the ranks decode different numbers of tokens (greedy, no early stop on a random model
        # is guaranteed, so the lengths are forced through max_new_tokens).
        engine.eval()
        whisper_live = engine.module.whisper
        features = local["input_features"]
        start = processor.tokenizer.convert_tokens_to_ids(
            ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
        )
        prefix = torch.tensor([start] * features.shape[0])
        new_tokens = 3 + 6 * rank
        kwargs = generation_kwargs(accelerator)
        result["generation_kwargs"] = kwargs
        config = copy.deepcopy(whisper_live.generation_config)
        config.forced_decoder_ids = None
        config.update(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        with torch.no_grad():
            out = GenerationMixin.generate(
                whisper_live, input_features=features, decoder_input_ids=prefix, generation_config=config, **kwargs
            )
            expected = GenerationMixin.generate(
                reference.whisper.eval(),
                input_features=features,
                decoder_input_ids=prefix,
                generation_config=copy.deepcopy(config),
            )
        lengths = accelerator.gather(torch.tensor([out.shape[1]])).tolist()
        result["generated_lengths"] = lengths
        same = torch.tensor([float(torch.equal(out, expected))])
        result["generation_matches_reference"] = bool(accelerator.gather(same).min() == 1)

        from orpo.eval.generate import generate_transcripts
        from orpo.eval.wer import generation_loader

        gen_loader = accelerator.prepare(generation_loader(test_set, batch_size=2))
        texts = generate_transcripts(engine, gen_loader, accelerator, processor.tokenizer, max_length=12)
        result["transcribed_clips"] = len(texts)
        result["test_clips"] = len(test_set)
    else:
        accelerator.backward(loss)  # under DeepSpeed: backward and the optimizer step
        live = {}
        adapters = [(n, p) for n, p in engine.module.named_parameters() if "lora_" in n]
        for name, p in adapters:
            with deepspeed.zero.GatheredParameters([p]):
                live[name] = p.detach().clone().cpu()
        final = consolidated_whisper(accelerator, engine)
        if accelerator.is_main_process:
            save_final_model(final, processor, out_dir)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            from peft import PeftModel
            from transformers import WhisperForConditionalGeneration

            # Outside zero.Init: a from_pretrained on one rank only would wait for the others in its broadcasts.
            with whole_model_loading(accelerator):
                base = WhisperForConditionalGeneration.from_pretrained(model_dir)
                reloaded = PeftModel.from_pretrained(base, out_dir / "adapter")
                merged = WhisperForConditionalGeneration.from_pretrained(out_dir)
            stored = {n: p.detach() for n, p in reloaded.named_parameters() if "lora_" in n}
            # Live names carry ORPOWhisper's "whisper." prefix.
            pairs = [(stored.get(n[len("whisper.") :]), t) for n, t in live.items()]
            result["adapter_tensors"] = len(pairs)
            result["adapter_missing"] = sum(s is None for s, _ in pairs)
            result["adapter_max_abs_diff"] = max(float((s - t).abs().max()) for s, t in pairs if s is not None)
            result["lora_B_nonzero"] = any(float(t.abs().max()) > 0 for n, t in live.items() if "lora_B" in n)
            expected = reloaded.merge_and_unload()
            result["merged_max_abs_diff"] = max(
                float((a - b).abs().max()) for a, b in zip(merged.state_dict().values(), expected.state_dict().values())
            )
            head, embedding = merged.proj_out.weight, merged.model.decoder.embed_tokens.weight
            result["merged_tied"] = head.data_ptr() == embedding.data_ptr()
    if accelerator.is_main_process:
        (out_dir / f"{mode}.json").write_text(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
