"""The hand-written Accelerate training loop: read it top to bottom in :func:`train`."""

from __future__ import annotations

import json
import logging
import math
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import WhisperConfig, get_scheduler

from orpo.checkpoint import (PREFIX, TMP_PREFIX, CheckpointError, check_checkpoint_files, check_position_settings,
                             checkpoint_state_dict, complete_checkpoints, finalize_checkpoint, load_checkpoint_weights,
                             read_trainer_state, remove_stale_staging, resolve_checkpoint, rotate_checkpoints)
from orpo.config import TrainConfig, config_to_dict
from orpo.data import PreferenceCollator, WhisperTokens, build_dataset
from orpo.evaluate import WerEvaluator, format_comparison, logged_base_results, write_eval_results
from orpo.distributed import (accelerator_device_kwargs, check_deepspeed_checkpoint_files, check_launch_config,
                              consolidated_whisper, fill_deepspeed_config, launch_prefix, param_ndim,
                              uses_deepspeed, whole_model_loading)
from orpo.loss import orpo_loss
from orpo.plots import plot_training_curves
from orpo.model import ORPOWhisper, freeze_encoder
from orpo.sampling import LengthGroupedSampler, packed_lengths
from orpo.pretrained import (AdaLoraState, adalora_orthogonal_penalty, apply_peft, check_hardware, is_multilingual,
                             load_processor, load_whisper, save_final_model)

logger = logging.getLogger("orpo")


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """Without CUDA, ``cpu=True`` and gloo give real DDP across processes (not independent copies)."""
    return Accelerator(
        **accelerator_device_kwargs(),  # cpu=True + gloo for DDP without CUDA; DeepSpeed: cpu=False + gloo
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=cfg.report_to or None,
        project_dir=cfg.output_dir,
        # The shuffling order of epoch e depends on seed + e only: a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )


def build_datasets(cfg: TrainConfig, processor, model_config: WhisperConfig):
    """Read and check both manifests; every bad line is an error before any weights load."""
    if not cfg.train_data:
        raise ValueError("train_data is not set: give a manifest in the recipe or with --train_data")
    tokens = WhisperTokens(processor.tokenizer, is_multilingual(model_config), cfg.task, cfg.timestamps,
                           model_config.max_target_positions)

    # Manifests or Hugging Face datasets; augment_config_path augments the training clips only.
    train_set = build_dataset(cfg, "train", processor.feature_extractor, tokens)
    test_set = build_dataset(cfg, "test", processor.feature_extractor, tokens) if cfg.test_data else None
    return train_set, test_set, tokens


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if param_ndim(p) >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if param_ndim(p) < 2], "weight_decay": 0.0},
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
        if totals[-1] == 0:  # every step since the last report was skipped (non-finite loss)
            return {}
        return {name: (totals[i] / totals[-1]).item() for i, name in enumerate(names)}

    def global_state(self, accelerator: Accelerator) -> dict:
        """Sums over all processes, for a checkpoint (every process must call this)."""
        names = sorted(self.sums)
        device = accelerator.device
        totals = torch.stack([self.sums[n].to(device) for n in names] + [torch.tensor(float(self.count), device=device, dtype=torch.float64)])
        totals = accelerator.reduce(totals, reduction="sum").tolist()
        return {"count": int(totals[-1]), "sums": dict(zip(names, totals[:-1]))}

    def load_global_state(self, state: dict, accelerator: Accelerator) -> None:
        """The main process takes the sums, the others zeros under the same names (their sum is the saved one)."""
        main = accelerator.is_main_process
        self.sums = {name: torch.tensor(value if main else 0.0, dtype=torch.float64)
                     for name, value in state.get("sums", {}).items()}
        self.count = state.get("count", 0) if main else 0


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN or Inf loss."""


class StopSignal:
    """SIGTERM / SIGINT (cluster preemption, Ctrl-C) ask the loop to stop after the current optimizer step.

    A second signal of the same kind stops at once, as if no handler were installed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name
        logger.warning("%s received: finishing the current optimizer step, then saving a checkpoint "
                       "(send it again to stop at once)", self.received)

    def install(self) -> "StopSignal":
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which stops cleanly and then ends them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batch_seed(seed: int, epoch: int, batch_index: int, process_index: int) -> int:
    """Seed of the random numbers (dropout) for one batch: a function of its position, so a resumed run draws
    the same ones as an uninterrupted run, whatever the data loader consumed while skipping ahead."""
    return int(np.random.SeedSequence([seed % 2**63, epoch, batch_index, process_index]).generate_state(1)[0])


def nonfinite_samples(pending: list, dataset) -> list[str]:
    """Where the non-finite losses of one optimizer step came from ("file:line"): the clips whose own loss is
    NaN/Inf, or every clip of a micro-batch whose total loss alone is (e.g. the AdaLoRA penalty)."""
    indices = []
    for loss, per_clip, sample_index in pending:
        clip_finite = torch.isfinite(per_clip["loss"])
        if not bool(clip_finite.all()):
            indices += sample_index[~clip_finite].tolist()
        elif not bool(torch.isfinite(loss)):
            indices += sample_index.tolist()
    items = getattr(dataset, "items", None)
    return [items[i].sample.source if items is not None else f"training clip #{i}" for i in indices]


def resume_command(output_dir: Path, num_processes: int) -> str:
    """The command that continues this run from its latest checkpoint (the resolved recipe is in output_dir)."""
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("train.py") else "train.py"
    # Several processes: add the launch options of the first run (--config_file, --num_machines, ...) as needed.
    launcher = launch_prefix(num_processes)  # DeepSpeed runs resume under DeepSpeed, with the same config file
    return (f"{launcher} {shlex.quote(script)} --config {shlex.quote(str(output_dir / 'config.yaml'))} "
            "--resume_from_checkpoint latest")


class TrainLog:
    """Console logging, and ``output_dir/train.log`` on the main process (appended to when resuming)."""

    FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

    def __init__(self, accelerator: Accelerator, output_dir: Path, append: bool):
        logging.basicConfig(format=self.FORMAT, level=logging.INFO if accelerator.is_main_process else logging.WARNING)
        self.handler = None
        self.root = logging.getLogger()
        self.level = self.root.level
        if accelerator.is_main_process:
            self.handler = logging.FileHandler(output_dir / "train.log", mode="a" if append else "w")
            self.handler.setFormatter(logging.Formatter(self.FORMAT))
            self.handler.setLevel(logging.INFO)
            self.root.addHandler(self.handler)
            if self.root.getEffectiveLevel() > logging.INFO:
                self.root.setLevel(logging.INFO)

    def close(self) -> None:
        if self.handler is not None:
            self.root.removeHandler(self.handler)
            self.handler.close()
            self.root.setLevel(self.level)


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
    """Run ORPO training as configured; returns the final evaluation metrics (empty without test_data, and when
    SIGTERM/SIGINT stopped the run: it then saves a checkpoint and says how to resume)."""
    check_hardware(cfg)
    check_launch_config(cfg)  # recipe versus accelerate/DeepSpeed launch config, before any weights load
    accelerator = make_accelerator(cfg)
    output_dir = Path(cfg.output_dir)
    resume_dir = None
    if cfg.resume_from_checkpoint:
        resume_dir = resolve_checkpoint(cfg.resume_from_checkpoint, output_dir)
        check_checkpoint_files(resume_dir, accelerator.num_processes, 1 + (cfg.peft == "adalora"),
                               scaler=accelerator.scaler is not None,
                               weights=accelerator.distributed_type.value not in ("DEEPSPEED", "FSDP"))
        if uses_deepspeed():  # the engine's files: one optimizer shard per process
            check_deepspeed_checkpoint_files(resume_dir, accelerator.num_processes, 1 + (cfg.peft == "adalora"))
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    train_log = TrainLog(accelerator, output_dir, append=resume_dir is not None)
    stop = StopSignal()
    try:
        return _train(cfg, accelerator, output_dir, resume_dir, stop)
    except Exception as err:
        logger.error("training failed: %s: %s", type(err).__name__, err)
        raise
    finally:
        stop.restore()
        train_log.close()


def _train(cfg: TrainConfig, accelerator: Accelerator, output_dir: Path, resume_dir: Path | None,
           stop: StopSignal) -> dict[str, float]:
    if accelerator.is_main_process:
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        remove_stale_staging(output_dir)
        if resume_dir is None:
            (output_dir / "metrics.jsonl").unlink(missing_ok=True)  # a resumed run appends
            earlier = complete_checkpoints(output_dir)
            if earlier:
                logger.warning("output_dir holds checkpoints of an earlier run (%s); this run starts afresh and "
                               "replaces them as it saves its own. To continue that run instead, pass "
                               "--resume_from_checkpoint latest", ", ".join(p.name for _, p in earlier))

    # Data first: a bad manifest stops the run before any weights load.
    processor = load_processor(cfg.base_model)
    model_config = WhisperConfig.from_pretrained(cfg.base_model)
    train_set, test_set, tokens = build_datasets(cfg, processor, model_config)
    logger.info("training clips: %d, evaluation clips: %d", len(train_set), len(test_set) if test_set else 0)

    collator = PreferenceCollator(pad_token_id=tokens.eot)
    worker_init = ignore_stop_signals if cfg.num_workers > 0 else None
    order = ({"sampler": LengthGroupedSampler(packed_lengths(train_set), cfg.per_device_train_batch_size, cfg.seed)}
             if cfg.group_by_length else {"shuffle": True})
    train_loader = DataLoader(train_set, batch_size=cfg.per_device_train_batch_size, collate_fn=collator,
                              num_workers=cfg.num_workers, worker_init_fn=worker_init, **order)
    test_loader = (DataLoader(test_set, batch_size=cfg.per_device_eval_batch_size, collate_fn=collator,
                              num_workers=cfg.num_workers, worker_init_fn=worker_init) if test_set else None)

    batches_per_process = math.ceil(len(train_loader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

    # The settings a checkpoint's data position depends on (checked on resume, before any weights load).
    settings = {"world_size": accelerator.num_processes, "per_device_train_batch_size": cfg.per_device_train_batch_size,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "train_clips": len(train_set),
                "seed": cfg.seed, "peft": cfg.peft, "group_by_length": cfg.group_by_length,
                "base_model": cfg.base_model}
    resumed = {}
    if resume_dir is not None:
        resumed = read_trainer_state(resume_dir)
        check_position_settings(resume_dir, resumed, settings)

    with whole_model_loading(accelerator):  # ZeRO-3: DeepSpeed partitions the model in prepare
        whisper = load_whisper(cfg, accelerator.local_process_index)
    whisper = apply_peft(whisper, cfg, total_steps)
    if cfg.freeze_encoder:
        freeze_encoder(whisper)
    model = ORPOWhisper(whisper, disable_prompt_loss=cfg.disable_prompt_loss,
                        selective_recompute=cfg.selective_recompute)
    if cfg.torch_compile:
        for module in model.whisper.modules():
            if type(module).__name__ in ("WhisperEncoder", "WhisperDecoder"):
                module.compile()
    optimizer = make_optimizer(model, cfg)
    fill_deepspeed_config(accelerator, cfg, model_config)  # DeepSpeed "auto" values from the recipe
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if test_loader is not None:
        test_loader = accelerator.prepare(test_loader)
        wer_eval = WerEvaluator.from_config(cfg, test_set, processor.tokenizer, accelerator)
    # Stepped by hand once per optimizer step: a prepared scheduler would step once per process. Registered so
    # that save_state/load_state keep it.
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    accelerator.register_for_checkpointing(scheduler)
    is_adalora = cfg.peft == "adalora"
    unwrapped = accelerator.unwrap_model(model)
    if is_adalora:
        accelerator.register_for_checkpointing(AdaLoraState(unwrapped.whisper))

    # Checkpoints keep only the adapter with PEFT (the frozen base is loaded from base_model again), and every
    # key is checked when loading.
    adapter_only = cfg.peft != "none"

    def save_weights_hook(models, weights, folder):
        if weights:
            weights[0] = checkpoint_state_dict(accelerator.unwrap_model(models[0]), adapter_only)

    def load_weights_hook(models, folder):
        if models:
            load_checkpoint_weights(accelerator.unwrap_model(models[0]), Path(folder), adapter_only)
            models.clear()

    accelerator.register_save_state_pre_hook(save_weights_hook)
    accelerator.register_load_state_pre_hook(load_weights_hook)

    tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                      for k, v in config_to_dict(cfg).items()}
    # TensorBoard writes to output_dir/whisper-orpo; wandb keeps its files in output_dir and names the run after it;
    # MLflow follows MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME (default ./mlruns, experiment whisper-orpo).
    accelerator.init_trackers("whisper-orpo", config=tracker_config,
                              init_kwargs={"wandb": {"dir": str(output_dir), "name": output_dir.name},
                                           "mlflow": {"run_name": output_dir.name}})
    log = MetricsLog(accelerator, output_dir)
    window = MetricWindow()

    global_step, epoch, step_in_epoch = 0, 0, 0
    skipped_total, skipped_in_a_row = 0, 0
    if resume_dir is not None:
        try:
            accelerator.load_state(str(resume_dir))
        except CheckpointError:
            raise
        except Exception as err:  # the run stops here: a model that did not load completely never trains
            raise CheckpointError(f"cannot resume from {resume_dir}: {type(err).__name__}: {err}") from err
        global_step, epoch, step_in_epoch = resumed["global_step"], resumed["epoch"], resumed["step_in_epoch"]
        skipped_total = resumed.get("skipped_nonfinite", 0)
        skipped_in_a_row = resumed.get("nonfinite_in_a_row", 0)
        window.load_global_state(resumed.get("metric_window", {}), accelerator)
        logger.info("resumed from %s: step %d of %d, epoch %d, %d batches into it", resume_dir, global_step,
                    total_steps, epoch, step_in_epoch)
        if step_in_epoch >= len(train_loader):  # saved at the end of an epoch
            epoch, step_in_epoch = epoch + 1, 0

    def save_checkpoint() -> Path:
        """Everything needed to continue exactly, into a temporary folder renamed into place once complete."""
        state = {"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                 "total_steps": total_steps, "skipped_nonfinite": skipped_total,
                 "nonfinite_in_a_row": skipped_in_a_row, "metric_window": window.global_state(accelerator),
                 "settings": settings, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        staging, final = output_dir / f"{TMP_PREFIX}{global_step}", output_dir / f"{PREFIX}{global_step}"
        if accelerator.is_main_process and staging.exists():
            shutil.rmtree(staging)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            finalize_checkpoint(staging, final, state)
            rotate_checkpoints(output_dir, final, cfg.save_total_limit)
            logger.info("saved checkpoint %s", final)
        accelerator.wait_for_everyone()
        return final

    logger.info("optimizer steps: %d (%d per epoch), processes: %d, distributed: %s, global batch: %d clips",
                total_steps, steps_per_epoch, accelerator.num_processes, accelerator.distributed_type.value,
                cfg.per_device_train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps)
    base_results = logged_base_results(output_dir) if resume_dir is not None else None
    if test_loader is not None and cfg.eval_before_train and global_step == 0:
        base_results = {**evaluate(model, test_loader, accelerator, cfg.alpha), **wer_eval(model, tag="base")}
        log.write(0, base_results)
    progress = tqdm(total=total_steps, initial=global_step, desc="train",
                    disable=not accelerator.is_local_main_process)
    stop.install()
    stopped_at = None
    pending = []  # this optimizer step's micro-batches: (loss, per-clip metrics, sample indices)
    model.train()
    while global_step < total_steps and stopped_at is None:
        train_loader.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):  # augmentation draws from (seed, epoch, clip index)
            train_set.set_epoch(epoch)
        loader = train_loader
        if step_in_epoch > 0:  # resumed mid-epoch: the same permutation, without the batches already seen
            loader = accelerator.skip_first_batches(train_loader, step_in_epoch)
            loader.set_epoch(epoch)
        for batch in loader:
            torch.manual_seed(batch_seed(cfg.seed, epoch, step_in_epoch, accelerator.process_index))
            step_in_epoch += 1
            with accelerator.accumulate(model):
                out = model(batch)
                loss, per_clip = orpo_loss(out["logps_chosen"], out["logps_rejected"], out["rejected_mask"],
                                           out["nll_chosen"], cfg.alpha)
                if is_adalora:
                    penalty = adalora_orthogonal_penalty(unwrapped.whisper)
                    if penalty is not None:
                        loss = loss + penalty
                        per_clip["adalora_orth_reg"] = penalty.detach().expand_as(per_clip["loss"])
                accelerator.backward(loss)  # on every process even when non-finite: DDP's all-reduce needs all
                pending.append((loss.detach(), per_clip, batch["sample_index"]))
                grad_norm = None
                if accelerator.sync_gradients:
                    # One all-reduce per optimizer step: did any process see a non-finite loss, or a stop signal?
                    flags = torch.stack([torch.stack([~torch.isfinite(p[0]) for p in pending]).any().double(),
                                         torch.tensor(float(stop.received is not None), dtype=torch.float64,
                                                      device=loss.device)])
                    flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum").tolist()
                    nonfinite, stop_requested = flags[0] > 0, flags[1] > 0
                    if not nonfinite and cfg.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        # Without a gradient scaler nothing else catches non-finite gradients of a finite loss
                        # (the norm is the same on every process: gradients are all-reduced).
                        if accelerator.scaler is None and not math.isfinite(float(grad_norm)):
                            nonfinite = True
                    if nonfinite:
                        skipped_total += 1
                        skipped_in_a_row += 1
                        bad = nonfinite_samples(pending, train_set)
                        logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in "
                                       "all); samples: %s", global_step + 1, skipped_in_a_row, skipped_total,
                                       ", ".join(bad) or "on another process")
                        if skipped_in_a_row >= cfg.max_nonfinite_steps:
                            samples = gather_object(bad) if accelerator.num_processes > 1 else bad
                            raise NonFiniteLossError(
                                f"step {global_step + 1}: the loss or its gradient was NaN or Inf in "
                                f"{skipped_in_a_row} optimizer steps in a row (max_nonfinite_steps: "
                                f"{cfg.max_nonfinite_steps}); stopping. Samples of the last such batch: "
                                f"{', '.join(dict.fromkeys(samples)) or 'unknown'}. Check these clips and "
                                "transcripts, lower the learning rate, or train in float32.")
                    else:
                        skipped_in_a_row = 0
                        optimizer.step()
                        if not accelerator.optimizer_step_was_skipped:
                            scheduler.step()
                            if is_adalora:  # after optimizer.step(), before zero_grad(): it reads the gradients
                                unwrapped.whisper.base_model.update_and_allocate(global_step)
                        for _, clips, _ in pending:
                            window.add(clips)
                    optimizer.zero_grad()
                    pending = []
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            if global_step % cfg.logging_steps == 0 or global_step == total_steps:
                metrics = window.mean(accelerator)
                metrics["learning_rate"] = scheduler.get_last_lr()[0]
                metrics["epoch"] = global_step / steps_per_epoch
                metrics["skipped_nonfinite"] = skipped_total
                if grad_norm is not None and not nonfinite:
                    metrics["grad_norm"] = float(grad_norm)
                if "loss" in metrics:
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.4f}",
                                         acc=f"{metrics['rewards/accuracies']:.2f}")
                log.write(global_step, metrics)
            if test_loader is not None and cfg.eval_steps > 0 and global_step % cfg.eval_steps == 0 \
                    and global_step < total_steps:
                log.write(global_step, {**evaluate(model, test_loader, accelerator, cfg.alpha), **wer_eval(model)})
            saved = None
            if (cfg.save_steps > 0 and global_step % cfg.save_steps == 0 and global_step < total_steps) or \
                    (stop_requested and global_step < total_steps):
                saved = save_checkpoint()
            if stop_requested and global_step < total_steps:
                stopped_at = saved
                break
            if global_step >= total_steps:
                break
        else:
            epoch, step_in_epoch = epoch + 1, 0
    progress.close()

    if stopped_at is not None:
        reason = stop.received or "a signal on another process"
        message = (f"Stopped by {reason} after optimizer step {global_step} of {total_steps}; checkpoint saved in "
                   f"{stopped_at}.\nTo resume: {resume_command(output_dir, accelerator.num_processes)}")
        logger.warning(message)
        if accelerator.is_main_process:
            print(message, flush=True)
        accelerator.end_training()
        return {}

    results = {}
    if test_loader is not None:
        results = {**evaluate(model, test_loader, accelerator, cfg.alpha), **wer_eval(model)}
        log.write(global_step, results)
        if accelerator.is_main_process:
            write_eval_results(output_dir, results, base=base_results, samples=wer_eval.samples())
            if base_results:
                logger.info("base vs tuned on %s:\n%s", cfg.test_data, format_comparison(base_results, results))
    accelerator.wait_for_everyone()
    final_whisper = consolidated_whisper(accelerator, model)  # every process: ZeRO-3 gathers the weights
    if accelerator.is_main_process:
        save_final_model(final_whisper, processor, output_dir)
        plot_training_curves(output_dir)
    accelerator.end_training()
    return results
