"""The hand-written Accelerate training loop: read it top to bottom in :func:`train`."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import WhisperConfig, get_scheduler

from orpo.config import TrainConfig, config_to_dict
from orpo.data import PreferenceCollator, PreferenceDataset, WhisperTokens, read_manifest
from orpo.loss import orpo_loss
from orpo.model import ORPOWhisper
from orpo.pretrained import (apply_peft, check_hardware, is_multilingual, load_processor, load_whisper,
                             save_final_model)

logger = logging.getLogger("orpo")


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """Without CUDA, ``cpu=True`` and gloo give real DDP across processes (not independent copies)."""
    cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=cfg.report_to or None,
        project_dir=cfg.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu and distributed else [],
    )


def build_datasets(cfg: TrainConfig, processor, model_config: WhisperConfig):
    """Read and check both manifests; every bad line is an error before any weights load."""
    if not cfg.train_data:
        raise ValueError("train_data is not set: give a manifest in the recipe or with --train_data")
    tokens = WhisperTokens(processor.tokenizer, is_multilingual(model_config), cfg.task, cfg.timestamps,
                           model_config.max_target_positions)

    def build(path):
        return PreferenceDataset(read_manifest(path), processor.feature_extractor, tokens, cfg.language,
                                 cfg.min_audio_len, cfg.max_audio_len)

    return build(cfg.train_data), (build(cfg.test_data) if cfg.test_data else None), tokens


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon)


class MetricWindow:
    """Sums of per-clip metrics since the last report, averaged over clips of all processes."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, per_clip: dict[str, torch.Tensor]) -> None:
        for name, values in per_clip.items():
            self.sums[name] = self.sums.get(name, 0) + values.double().sum()
        self.count += next(iter(per_clip.values())).numel()

    def mean(self, accelerator: Accelerator) -> dict[str, float]:
        names = sorted(self.sums)
        device = accelerator.device
        totals = torch.stack([self.sums[n].to(device) for n in names] + [torch.tensor(float(self.count), device=device, dtype=torch.float64)])
        totals = accelerator.reduce(totals, reduction="sum")
        self.sums, self.count = {}, 0
        return {name: (totals[i] / totals[-1]).item() for i, name in enumerate(names)}


def evaluate(model, loader, accelerator: Accelerator, alpha: float) -> dict[str, float]:
    """Eval loss and preference metrics on the whole test set, averaged over clips of all processes."""
    model.eval()
    window = MetricWindow()
    with torch.no_grad():
        for batch in tqdm(loader, desc="eval", leave=False, disable=not accelerator.is_local_main_process):
            out = model(batch)
            _, per_clip = orpo_loss(out["logps_chosen"], out["logps_rejected"], out["rejected_mask"],
                                    out["nll_chosen"], alpha)
            window.add(accelerator.gather_for_metrics(per_clip))
    model.train()
    totals = {name: (value / window.count).item() for name, value in window.sums.items()}
    return {f"eval/{name}": value for name, value in totals.items()}


class MetricsLog:
    """Console lines and ``output_dir/metrics.jsonl`` (one JSON record per report), main process only."""

    def __init__(self, accelerator: Accelerator, output_dir: Path):
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.accelerator.log(metrics, step=step)
        if not self.accelerator.is_main_process:
            return
        tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run ORPO training as configured; returns the final evaluation metrics (empty without test_data)."""
    check_hardware(cfg)
    accelerator = make_accelerator(cfg)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)

    # Data first: a bad manifest stops the run before any weights load.
    processor = load_processor(cfg.base_model)
    model_config = WhisperConfig.from_pretrained(cfg.base_model)
    train_set, test_set, tokens = build_datasets(cfg, processor, model_config)
    logger.info("training clips: %d, evaluation clips: %d", len(train_set), len(test_set) if test_set else 0)

    collator = PreferenceCollator(pad_token_id=tokens.eot)
    train_loader = DataLoader(train_set, batch_size=cfg.per_device_train_batch_size, shuffle=True,
                              collate_fn=collator, num_workers=cfg.num_workers)
    test_loader = (DataLoader(test_set, batch_size=cfg.per_device_eval_batch_size, collate_fn=collator,
                              num_workers=cfg.num_workers) if test_set else None)

    batches_per_process = math.ceil(len(train_loader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

    whisper = load_whisper(cfg, accelerator.local_process_index)
    whisper = apply_peft(whisper, cfg, total_steps)
    model = ORPOWhisper(whisper, disable_prompt_loss=cfg.disable_prompt_loss)
    if cfg.torch_compile:
        for module in model.whisper.modules():
            if type(module).__name__ in ("WhisperEncoder", "WhisperDecoder"):
                module.compile()
    optimizer = make_optimizer(model, cfg)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if test_loader is not None:
        test_loader = accelerator.prepare(test_loader)
    # Stepped by hand once per optimizer step: a prepared scheduler would step once per process.
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)

    tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                      for k, v in config_to_dict(cfg).items()}
    accelerator.init_trackers("whisper-orpo", config=tracker_config)
    log = MetricsLog(accelerator, output_dir)
    is_adalora = cfg.peft == "adalora"

    logger.info("optimizer steps: %d (%d per epoch), processes: %d, distributed: %s, global batch: %d clips",
                total_steps, steps_per_epoch, accelerator.num_processes, accelerator.distributed_type.value,
                cfg.per_device_train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps)
    progress = tqdm(total=total_steps, desc="train", disable=not accelerator.is_local_main_process)
    window = MetricWindow()
    global_step, epoch = 0, 0
    model.train()
    while global_step < total_steps:
        train_loader.set_epoch(epoch)
        for batch in train_loader:
            with accelerator.accumulate(model):
                out = model(batch)
                loss, per_clip = orpo_loss(out["logps_chosen"], out["logps_rejected"], out["rejected_mask"],
                                           out["nll_chosen"], cfg.alpha)
                accelerator.backward(loss)
                window.add(per_clip)
                grad_norm = None
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                if accelerator.sync_gradients and is_adalora:
                    accelerator.unwrap_model(model).whisper.base_model.update_and_allocate(global_step)
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            if global_step % cfg.logging_steps == 0 or global_step == total_steps:
                metrics = window.mean(accelerator)
                metrics["learning_rate"] = scheduler.get_last_lr()[0]
                metrics["epoch"] = global_step / steps_per_epoch
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.4f}",
                                     acc=f"{metrics['rewards/accuracies']:.2f}")
                log.write(global_step, metrics)
            if test_loader is not None and cfg.eval_steps > 0 and global_step % cfg.eval_steps == 0 \
                    and global_step < total_steps:
                log.write(global_step, evaluate(model, test_loader, accelerator, cfg.alpha))
            if global_step >= total_steps:
                break
        epoch += 1
    progress.close()

    results = {}
    if test_loader is not None:
        results = evaluate(model, test_loader, accelerator, cfg.alpha)
        log.write(global_step, results)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final_model(accelerator.unwrap_model(model).whisper, processor, output_dir)
    accelerator.end_training()
    return results
