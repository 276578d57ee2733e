"""The hand-written Accelerate training loop: ``setup`` → per batch ``step`` → ``finish_optimizer_step`` →
``after_step`` → ``finish``.

Read :meth:`ORPOTrainer.setup` for what a run is made of (every check runs before any weights load), then
:meth:`ORPOTrainer.train` for the loop itself.
"""

from __future__ import annotations

import functools
import logging
import math
import shlex
import sys
from pathlib import Path

import torch
import yaml
from accelerate.utils import broadcast_object_list, gather_object, send_to_device, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import WhisperConfig, get_scheduler

from orpo.config import TrainConfig, config_to_dict
from orpo.data.collate import PreferenceCollator
from orpo.data.dataset import build_datasets, build_regression_dataset
from orpo.data.pair_table import PairTable
from orpo.data.sampling import LengthGroupedSampler
from orpo.errors import NonFiniteLossError, OutputDirError
from orpo.eval.generate import EvaluationStopped
from orpo.eval.preference import preference_metrics
from orpo.eval.reference import reference_logps
from orpo.eval.regression import RegressionEvaluator
from orpo.eval.report import format_comparison, write_eval_results
from orpo.eval.text import uses_cer
from orpo.eval.wer import WerEvaluator
from orpo.files import write_text_atomic
from orpo.loss.objective import Objective
from orpo.model.fetch import check_model_source
from orpo.model.load import check_hardware, load_processor, load_whisper, save_adapter, save_final_model
from orpo.model.log_mel import LogMel
from orpo.model.orpo_whisper import ORPOWhisper, freeze_encoder
from orpo.model.peft import adapter_hooks, apply_peft
from orpo.scale.checks import check_launch_config
from orpo.scale.launch import (
    build_accelerator,
    launch_prefix,
    long_wait_group,
    raise_on_every_process,
    unwrap_model,
    uses_deepspeed,
)
from orpo.scale.zero3 import consolidated_whisper, fill_deepspeed_config, param_ndim, whole_model_loading
from orpo.train.checkpoint import (
    check_checkpoint_files,
    checkpoint_name,
    load_checkpoint,
    process_state_names,
    read_trainer_state,
    register_checkpoint_hooks,
    remove_stale_staging,
    resolve_checkpoint,
    save_checkpoint,
)
from orpo.train.forgetting import ForgettingGuard
from orpo.train.grad_share import gradient_share
from orpo.train.logs import MetricsLog, TrainLog, check_trackers, init_trackers, logged_base_results
from orpo.train.plots import plot_training_curves
from orpo.train.refresh import PairRefresher
from orpo.train.run_folder import RunLock, check_output_dir, move_earlier_run
from orpo.train.selection import ModelSelection, check_metric_name, selection_on
from orpo.train.signals import StopSignal, ignore_stop_signals
from orpo.train.state import TrainState, batch_seed, check_position_settings, run_settings
from orpo.train.streamed import BadSamples, stream_loader

logger = logging.getLogger("orpo")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if param_ndim(p) >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if param_ndim(p) < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)


def nonfinite_samples(pending: list, dataset) -> list[str]:
    """Where the non-finite losses of one optimizer step came from ("file:line", or a stream's shard and key): the
    clips whose own loss is NaN/Inf, or every clip of a micro-batch whose total loss alone is (e.g. the AdaLoRA
    penalty). A micro-batch names its clips by dataset index, or (streamed) by their sources."""
    names = []
    for loss, per_clip, clips in pending:
        bad = (~torch.isfinite(per_clip["loss"])).tolist()
        if not any(bad) and not bool(torch.isfinite(loss)):
            bad = [True] * len(bad)
        picked = [clip for clip, is_bad in zip(clips if isinstance(clips, list) else clips.tolist(), bad) if is_bad]
        names += [clip if isinstance(clip, str) else dataset.items[clip].sample.source for clip in picked]
    return names


def resume_command(output_dir: Path, num_processes: int) -> str:
    """The command that continues this run from its latest checkpoint (the resolved recipe is in output_dir)."""
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("train.py") else "train.py"
    # Several processes: add the launch options of the first run (--config_file, --num_machines, ...) as needed.
    launcher = launch_prefix(num_processes)  # DeepSpeed runs resume under DeepSpeed, with the same config file
    return (
        f"{launcher} {shlex.quote(script)} --config {shlex.quote(str(output_dir / 'config.yaml'))} "
        "--resume_from_checkpoint latest"
    )


class ORPOTrainer:
    """One training run of a recipe: ``setup()``, then ``train()`` returns the final evaluation metrics."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.stop = StopSignal()
        self.pending = []  # this optimizer step's micro-batches: (loss, per-clip metrics, sample indices)
        self.grad_norm = None
        self.last_batch = None  # the step's last micro-batch, for log_grad_share
        self.train_log = None
        self.lock = RunLock(self.output_dir)

    # ----------------------------------------------------------------------------------------------
    # setup

    def setup(self) -> None:
        """Every check first (recipe, launch, data, the checkpoint to resume from, output_dir), reading only; then
        output_dir is locked and written, and the weights load."""
        cfg = self.cfg
        check_hardware(cfg)
        check_trackers(cfg)
        check_launch_config(cfg)  # recipe versus accelerate/DeepSpeed launch config, before any weights load
        check_model_source(cfg.base_model)
        self.accelerator = build_accelerator(
            cfg.mixed_precision,
            cfg.gradient_accumulation_steps,
            cfg.report_to or None,
            cfg.output_dir,
            data_seed=cfg.seed,
        )
        self.train_log = TrainLog(self.accelerator)  # held in memory until output_dir may be written
        if cfg.features_on_device is None:  # log-mel on the accelerator where there is one (config.yaml records it)
            cfg.features_on_device = self.accelerator.device.type == "cuda"
        self.resume_dir = (
            resolve_checkpoint(cfg.resume_from_checkpoint, self.output_dir) if cfg.resume_from_checkpoint else None
        )
        set_seed(cfg.seed)
        self.setup_data()  # a bad manifest stops the run here, before any weights load
        check_metric_name(cfg, self.test_uses_cer())
        self.setup_schedule()
        self.setup_output_dir()
        self.setup_model()
        self.setup_optimization()
        self.setup_state()

    def setup_output_dir(self) -> None:
        """The last check (output_dir usable, not in use, no earlier run to replace unless told), then the lock
        and the first writes: nothing in output_dir changes before this point."""
        cfg, accelerator = self.cfg, self.accelerator
        problem = None
        if accelerator.is_main_process:
            try:
                check_output_dir(self.output_dir, self.resume_dir is not None, cfg.overwrite_output_dir)
                self.output_dir.mkdir(parents=True, exist_ok=True)
                self.lock.acquire()
            except OutputDirError as err:
                problem = str(err)
        if accelerator.num_processes > 1:  # every process stops on the main process's finding
            problem = broadcast_object_list([problem])[0]
        if problem is not None:
            raise OutputDirError(problem)
        if accelerator.is_main_process:
            if self.resume_dir is None:
                move_earlier_run(self.output_dir)
            self.train_log.open_file(self.output_dir, append=self.resume_dir is not None)
            write_text_atomic(self.output_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            remove_stale_staging(self.output_dir)
        accelerator.wait_for_everyone()

    def setup_data(self) -> None:
        """Both datasets, read and checked in full; the loaders over them (prepared later with the model)."""
        cfg = self.cfg
        self.processor = load_processor(cfg.base_model)
        self.model_config = WhisperConfig.from_pretrained(cfg.base_model)
        self.train_set, self.test_set, self.tokens = self.checked_datasets()
        self.regression_set = (
            build_regression_dataset(cfg, self.processor.feature_extractor, self.tokens)
            if cfg.regression_data
            else None
        )
        if cfg.streaming:
            self.train_set, self.train_loader = stream_loader(
                cfg, self.processor, self.tokens, self.accelerator, ignore_stop_signals if cfg.num_workers else None
            )
        logger.info(
            "training clips: %s, evaluation clips: %d%s",
            "streamed" if cfg.streaming else len(self.train_set),
            len(self.test_set) if self.test_set else 0,
            f", regression clips: {len(self.regression_set)}" if self.regression_set else "",
        )
        self.setup_pairs()
        collator = PreferenceCollator(pad_token_id=self.tokens.eot)
        self.worker_init = ignore_stop_signals if cfg.num_workers > 0 else None
        self.test_loader = self.eval_loader(collator)
        if cfg.streaming:
            return
        order = {"shuffle": True}
        if cfg.group_by_length:
            lengths = self.train_set.packed_lengths()
            order = {"sampler": LengthGroupedSampler(lengths, cfg.per_device_train_batch_size, cfg.seed)}
        self.train_loader = DataLoader(
            self.train_set,
            batch_size=cfg.per_device_train_batch_size,
            collate_fn=collator,
            num_workers=cfg.num_workers,
            worker_init_fn=self.worker_init,
            **order,
        )

    def eval_loader(self, collator) -> DataLoader | None:
        """The loader over the test set (None without test_data)."""
        if not self.test_set:
            return None
        return DataLoader(
            self.test_set,
            batch_size=self.cfg.per_device_eval_batch_size,
            collate_fn=collator,
            num_workers=self.cfg.num_workers,
            worker_init_fn=self.worker_init,
        )

    def checked_datasets(self):
        """The datasets, a manifest checked once per run: the main process checks it (or reads its cached index) and
        the others read the index it wrote. They wait for it in a group with a day-long timeout (a cold check of
        millions of lines outlasts the default one), and any error stops every process with its message."""
        accelerator, build = self.accelerator, functools.partial(build_datasets, self.cfg, self.processor)
        if accelerator.num_processes == 1:
            return build(self.model_config)
        group = long_wait_group()
        built, problem = None, None
        if accelerator.is_main_process:
            try:
                built = build(self.model_config)
            except Exception as err:  # every process must hear of it, or the others wait here for ever
                problem = err
        raise_on_every_process(problem, group, main_only=True)
        if not accelerator.is_main_process:
            try:
                built = build(self.model_config, build_index=False)
            except Exception as err:
                problem = err
        raise_on_every_process(problem, group)
        return built

    def setup_pairs(self) -> None:
        """The objective, and the pair tables when the pairs change during the run (``refresh_pairs_steps``) or an
        objective needs reference log-probs (DPO, IPO): batches then take their rows or references from them."""
        cfg = self.cfg
        self.objective = Objective.from_config(cfg)
        reference = self.objective.needs_reference
        self.pairs = self.test_pairs = None
        if cfg.refresh_pairs_steps > 0 or reference:
            self.pairs = PairTable(
                self.train_set, self.tokens.eot, rows=cfg.refresh_pairs_steps > 0, reference=reference
            )
        if reference and self.test_set is not None:
            self.test_pairs = PairTable(self.test_set, self.tokens.eot, reference=True)

    def test_uses_cer(self) -> bool:
        """Whether the test set is scored by CER alone (every clip in a language written without spaces)."""
        return bool(self.test_set) and all(uses_cer(item.language_code) for item in self.test_set.items)

    def setup_schedule(self) -> None:
        """Optimizer steps per epoch and in all; the checkpoint to resume from must fit this run."""
        cfg, world = self.cfg, self.accelerator.num_processes
        self.steps_per_epoch = None  # a stream's length is not known
        if not cfg.streaming:
            batches_per_process = math.ceil(len(self.train_loader) / world)
            self.steps_per_epoch = math.ceil(batches_per_process / cfg.gradient_accumulation_steps)
        self.total_steps = (
            cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * self.steps_per_epoch)
        )
        self.settings = run_settings(cfg, world, None if cfg.streaming else len(self.train_set))
        self.resumed = {}
        if self.resume_dir is not None:
            self.resumed = read_trainer_state(self.resume_dir)
            check_position_settings(self.resume_dir, self.resumed.get("settings", {}), self.settings)

    def setup_model(self) -> None:
        cfg = self.cfg
        with whole_model_loading(self.accelerator):  # ZeRO-3: DeepSpeed partitions the model in prepare
            whisper = load_whisper(cfg, self.accelerator.local_process_index)
        whisper = apply_peft(whisper, cfg, self.total_steps)
        if cfg.freeze_encoder:
            freeze_encoder(whisper)
        self.model = ORPOWhisper(
            whisper,
            disable_prompt_loss=cfg.disable_prompt_loss,
            selective_recompute=cfg.selective_recompute,
            log_mel=LogMel(self.processor.feature_extractor) if cfg.features_on_device else None,
        )
        if cfg.torch_compile:
            for module in whisper.modules():
                if type(module).__name__ in ("WhisperEncoder", "WhisperDecoder"):
                    module.compile()
        self.adapters = adapter_hooks(whisper, cfg)

    def setup_optimization(self) -> None:
        """Optimizer, prepared model and loaders, the schedule, checkpointed objects, evaluators, trackers."""
        cfg, accelerator = self.cfg, self.accelerator
        optimizer = make_optimizer(self.model, cfg)
        fill_deepspeed_config(accelerator, cfg, self.model_config)  # DeepSpeed "auto" values from the recipe
        if cfg.streaming:  # each process reads its own part of the stream: the loader is not sharded again
            self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        else:
            self.model, self.optimizer, self.train_loader = accelerator.prepare(
                self.model, optimizer, self.train_loader
            )
        self.wer_eval = None
        if self.test_loader is not None:
            self.test_loader = accelerator.prepare(self.test_loader)
            self.wer_eval = WerEvaluator.from_config(cfg, self.test_set, accelerator, worker_init_fn=self.worker_init)
        self.regression_eval = None
        if self.regression_set is not None:
            self.regression_eval = RegressionEvaluator.from_config(
                cfg, self.regression_set, accelerator, worker_init_fn=self.worker_init
            )
        # Stepped by hand once per optimizer step: a prepared scheduler would step once per process.
        self.scheduler = get_scheduler(
            cfg.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=cfg.warmup_steps,
            num_training_steps=self.total_steps,
        )
        self.checkpoint_objects = {"scheduler": self.scheduler, **self.adapters.checkpoint_objects()}
        if self.pairs is not None:  # the pairs and reference log-probs as they stand: a resumed run trains on them
            self.checkpoint_objects["pairs"] = self.pairs
        if self.test_pairs is not None:
            self.checkpoint_objects["eval_pairs"] = self.test_pairs
        self.refresher = None
        if cfg.refresh_pairs_steps > 0:
            needs_reference = self.objective.needs_reference
            self.refresher = PairRefresher(cfg, self.pairs, accelerator, needs_reference, self.output_dir)
        # a streamed loader's position is each process's own
        self.process_objects = {"stream": self.train_loader} if cfg.streaming else {}
        register_checkpoint_hooks(
            accelerator, self.model, self.checkpoint_objects, cfg.peft != "none", process_objects=self.process_objects
        )
        init_trackers(accelerator, cfg, self.output_dir)
        self.log = MetricsLog(accelerator, self.output_dir)

    def setup_state(self) -> None:
        """A fresh position, or the checkpoint's (its files checked against what this run registered)."""
        accelerator = self.accelerator
        self.state = TrainState()
        self.base_results = None
        self.early_stopped = None  # the reason, once early stopping ends the run
        self.selection = (
            ModelSelection(self.cfg, self.test_uses_cer(), self.resumed.get("best")) if selection_on(self.cfg) else None
        )
        self.guard = ForgettingGuard.from_config(self.cfg)
        self.pending_refresh = None  # the step of a refresh that a stop signal interrupted: done first on resume
        self.bad_samples = BadSamples(self.cfg.max_bad_samples, self.output_dir, accelerator)
        if self.resume_dir is None:
            return
        check_checkpoint_files(
            self.resume_dir,
            accelerator.num_processes,
            list(self.checkpoint_objects) + process_state_names(self.process_objects, accelerator.num_processes),
            scaler=accelerator.scaler is not None,
            deepspeed=uses_deepspeed(),
        )
        load_checkpoint(accelerator, self.resume_dir)
        batches = None if self.cfg.streaming else len(self.train_loader)  # a stream's position is its loader's
        self.state = TrainState.from_record(self.resumed, accelerator, batches)
        logger.info(
            "resumed from %s: step %d of %d, epoch %d, %d batches into it",
            self.resume_dir,
            self.resumed["global_step"],
            self.total_steps,
            self.resumed["epoch"],
            self.resumed["step_in_epoch"],
        )
        self.base_results = logged_base_results(self.output_dir)
        self.guard.set_base(self.base_results or {})
        self.guard.over_limit = list(self.resumed.get("regression_over_limit", []))
        self.pending_refresh = self.resumed.get("pending_refresh")
        self.bad_samples.resume(self.resumed.get("bad_samples", 0), self.resumed["global_step"])

    # ----------------------------------------------------------------------------------------------
    # train

    def train(self) -> dict[str, float]:
        """Run the loop; the final evaluation metrics (empty without test_data, and when a stop signal ended
        the run: it then saves a checkpoint and says how to resume)."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        logger.info(
            "optimizer steps: %d (%s per epoch), processes: %d, distributed: %s, global batch: %d clips",
            self.total_steps,
            self.steps_per_epoch or "a stream: unknown",
            accelerator.num_processes,
            accelerator.distributed_type.value,
            cfg.per_device_train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps,
        )
        self.compute_references()
        if self.pending_refresh is not None:
            self.refresh_pairs(self.pending_refresh)
        base_wanted = cfg.eval_before_train or self.regression_eval is not None
        if self.test_loader is not None and base_wanted and state.global_step == 0:
            self.base_results = self.evaluate_base()
            self.log.write(0, self.base_results)
        self.progress = tqdm(
            total=self.total_steps,
            initial=state.global_step,
            desc="train",
            disable=not accelerator.is_local_main_process,
        )
        self.stop.install()
        self.model.train()
        stopped_at = None
        while state.global_step < self.total_steps and stopped_at is None and self.early_stopped is None:
            for batch in self.epoch_batches():
                self.step(batch)
                if not accelerator.sync_gradients:
                    continue  # gradient accumulation: more micro-batches to come
                stop_requested = self.finish_optimizer_step()
                stopped_at = self.after_step(stop_requested)
                if stopped_at is not None or self.early_stopped or state.global_step >= self.total_steps:
                    break
            else:
                state.next_epoch()
        self.progress.close()
        return self.finish(stopped_at)

    def epoch_batches(self):
        """This epoch's batches: the same permutation on every process and after a resume (seed + epoch); a run
        resumed mid-epoch skips the batches it has already seen."""
        state = self.state
        if self.cfg.streaming:  # endless: the stream starts again by itself, the loop stops at max_steps
            self.stream_batches = iter(self.train_loader)
            device = self.accelerator.device
            return (send_to_device(self.bad_samples.take(batch), device) for batch in self.stream_batches)
        self.train_loader.set_epoch(state.epoch)
        self.train_set.set_epoch(state.epoch)  # augmentation draws from (seed, epoch, clip index)
        if state.step_in_epoch == 0:
            return self.train_loader
        loader = self.accelerator.skip_first_batches(self.train_loader, state.step_in_epoch)
        loader.set_epoch(state.epoch)
        return loader

    def step(self, batch: dict) -> None:
        """Forward and backward of one micro-batch (gradients accumulate until the optimizer step)."""
        state, accelerator = self.state, self.accelerator
        # Dropout draws from the batch's position, so a resumed run draws what the uninterrupted one did.
        torch.manual_seed(batch_seed(self.cfg.seed, state.epoch, state.step_in_epoch, accelerator.process_index))
        state.step_in_epoch += 1
        if self.pairs is not None:  # the pairs as they stand now (a refresh may have changed them)
            batch = {**batch, **self.pairs.batch_fields(batch["sample_index"])}
        with accelerator.accumulate(self.model):
            loss, per_clip = self.objective(self.model(batch), batch)
            loss = self.adapters.regularise(loss, per_clip)
            accelerator.backward(loss)  # on every process even when non-finite: DDP's all-reduce needs all
        self.pending.append((loss.detach(), per_clip, batch.get("sources", batch["sample_index"])))
        if self.cfg.log_grad_share:
            self.last_batch = batch

    def finish_optimizer_step(self) -> bool:
        """The one all-reduce of the step (a non-finite loss or a stop signal on any process), clipping, then
        the optimizer step or its skip. Returns whether a stop was asked for."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        nonfinite = torch.stack([~torch.isfinite(p[0]) for p in self.pending]).any().double()
        stop = torch.tensor(float(self.stop.received is not None), dtype=torch.float64)
        bad = torch.tensor(float(len(self.bad_samples.new)), dtype=torch.float64)
        flags = torch.stack([nonfinite.to(accelerator.device), stop.to(accelerator.device), bad.to(accelerator.device)])
        flags = accelerator.reduce(flags, reduction="sum").tolist()
        nonfinite, stop_requested = flags[0] > 0, flags[1] > 0
        self.bad_samples.settle(state.global_step + 1, any_new=flags[2] > 0)
        self.grad_norm = None
        if not nonfinite and cfg.max_grad_norm > 0:
            self.grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            # Without a gradient scaler nothing else catches non-finite gradients of a finite loss (the norm is
            # the same on every process: gradients are all-reduced).
            nonfinite = accelerator.scaler is None and not math.isfinite(float(self.grad_norm))
        if nonfinite:
            self.skip_nonfinite_step()
        else:
            state.skipped_in_a_row = 0
            self.optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                self.scheduler.step()
                self.adapters.after_optimizer_step(state.global_step)
            for _, clips, _ in self.pending:
                state.window.add(clips)
        self.optimizer.zero_grad()
        self.pending = []
        state.global_step += 1
        self.progress.update(1)
        return stop_requested

    def skip_nonfinite_step(self) -> None:
        """Count a skipped step, name its clips; too many in a row stop the run."""
        cfg, state = self.cfg, self.state
        state.skipped_total += 1
        state.skipped_in_a_row += 1
        bad = nonfinite_samples(self.pending, self.train_set)
        logger.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all); samples: %s",
            state.global_step + 1,
            state.skipped_in_a_row,
            state.skipped_total,
            ", ".join(bad) or "on another process",
        )
        if state.skipped_in_a_row >= cfg.max_nonfinite_steps:
            samples = gather_object(bad) if self.accelerator.num_processes > 1 else bad
            raise NonFiniteLossError(
                f"step {state.global_step + 1}: the loss or its gradient was NaN or Inf in {state.skipped_in_a_row} "
                f"optimizer steps in a row (max_nonfinite_steps: {cfg.max_nonfinite_steps}); stopping. Samples of "
                f"the last such batch: {', '.join(dict.fromkeys(samples)) or 'unknown'}. Check these clips and "
                "transcripts, lower the learning rate, or train in float32."
            )

    def after_step(self, stop_requested: bool) -> Path | None:
        """Log, evaluate and save as the recipe asks; the checkpoint folder when a stop signal ends the run (a
        signal during an evaluation ends the evaluation at its next batch, unlogged, and the checkpoint follows)."""
        cfg, step = self.cfg, self.state.global_step
        before_end = step < self.total_steps
        if step % cfg.logging_steps == 0 or not before_end:
            self.log_train_metrics()
        if self.refresher is not None and self.refresher.due(step) and before_end:
            stop_requested = self.refresh_pairs(step) or stop_requested
        if self.test_loader is not None and cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and before_end:
            try:
                metrics = self.evaluate(stop=self.stop_agreed)
                self.log.write(step, metrics)
                self.select(step, metrics)
            except EvaluationStopped:
                logger.warning("step %d: evaluation stopped by a stop signal; it is not logged", step)
                stop_requested = True
        stopping = stop_requested and before_end
        if (cfg.save_steps > 0 and step % cfg.save_steps == 0 and before_end) or stopping:
            saved = self.save_checkpoint()
            if stopping:
                return saved
        return None

    def log_train_metrics(self) -> None:
        state = self.state
        metrics = state.window.mean(self.accelerator)
        metrics["learning_rate"] = self.scheduler.get_last_lr()[0]
        if self.steps_per_epoch:
            metrics["epoch"] = state.global_step / self.steps_per_epoch
        if self.cfg.streaming:
            metrics["bad_samples"] = self.bad_samples.total
        metrics["skipped_nonfinite"] = state.skipped_total
        if self.grad_norm is not None and math.isfinite(float(self.grad_norm)):
            metrics["grad_norm"] = float(self.grad_norm)
        if self.cfg.log_grad_share and self.last_batch is not None:
            metrics.update(self.grad_share())
        if "loss" in metrics:
            self.progress.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                margin=f"{metrics['rewards/margins']:.4f}",
                acc=f"{metrics['rewards/accuracies']:.2f}",
            )
        self.log.write(state.global_step, metrics)

    def grad_share(self) -> dict[str, float]:
        """The odds-ratio term's share of the gradient on this step's last micro-batch (after the update),
        averaged over processes (:mod:`orpo.train.grad_share`)."""
        accelerator = self.accelerator
        share = gradient_share(
            unwrap_model(self.model, accelerator), self.last_batch, self.cfg.alpha, accelerator.autocast()
        )
        names = sorted(share)
        values = torch.stack([share[name] for name in names]).to(accelerator.device)
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="mean")
        return dict(zip(names, values.tolist()))

    def evaluate_base(self) -> dict[str, float]:
        """The base model, before the first step: the whole evaluation with ``eval_before_train``, else the
        regression set alone; the forgetting guard measures every later change from it."""
        if self.cfg.eval_before_train:
            results = self.evaluate(tag="base", compare_beams=True)
        else:
            results = self.regression_eval(self.model, tag="base")
        self.guard.set_base(results)
        return results

    def evaluate(self, tag: str = "tuned", compare_beams: bool = False, stop=None) -> dict[str, float]:
        """Eval loss and preference metrics, then WER/CER of generated transcripts, on the whole test set; with
        ``compare_beams`` (the base and final evaluations) also WER/CER at ``compare_num_beams`` (``wer_beamN``);
        with ``regression_data`` the regression set's metrics and their change from the base model.
        ``stop`` (:meth:`stop_agreed`) ends it between batches with :class:`EvaluationStopped`."""
        metrics = preference_metrics(
            self.model, self.test_loader, self.accelerator, self.objective, self.test_pairs, stop=stop
        )
        metrics.update(self.wer_eval(self.model, tag=tag, stop=stop))
        beams = self.cfg.compare_num_beams
        if compare_beams and beams > 0:
            beam_metrics = self.wer_eval(self.model, tag=f"{tag}_beam{beams}", num_beams=beams, stop=stop)
            metrics.update({f"{key}_beam{beams}": value for key, value in beam_metrics.items()})
        if self.regression_eval is not None:
            metrics.update(self.guard.add_change(self.regression_eval(self.model, tag=tag, stop=stop)))
        return metrics

    def stop_agreed(self) -> bool:
        """Whether a stop signal reached any process (one all-reduce, so every process stops at the same batch)."""
        flag = torch.tensor(float(self.stop.received is not None), device=self.accelerator.device)
        return float(self.accelerator.reduce(flag, reduction="sum")) > 0

    def select(self, step: int, metrics: dict[str, float]) -> None:
        """Model selection and the forgetting guard: the evaluation at this checkpoint step may be the best
        (unless its regression rose past ``max_regression`` and ``load_best_model_at_end`` excludes it); early
        stopping or, without ``load_best_model_at_end``, such a regression ends the run."""
        over_limit = self.guard.rose_too_far(step, metrics)
        if self.selection is not None:
            candidate = not (over_limit and self.guard.exclude)
            self.selection.update(step, metrics, checkpoint_name(step), candidate=candidate)
            if self.selection.out_of_patience():
                self.early_stopped = self.selection.stop_reason(step)
        if over_limit and not self.guard.exclude:
            self.early_stopped = self.guard.stop(step)
        if self.early_stopped:
            logger.warning("%s; the run ends here", self.early_stopped)

    def compute_references(self) -> None:
        """Reference log-probs (DPO, IPO) of every pair that has none yet: at the start of a run, with the model
        before its first step (a resumed run has them from its checkpoint)."""
        for table, name in ((self.pairs, "train"), (self.test_pairs, "test")):
            if table is None or not table.with_reference or not table.missing_reference():
                continue
            if self.state.global_step > 0 and self.cfg.peft == "none":
                raise RuntimeError(f"the {name} pairs have no reference log-probs at step {self.state.global_step}")
            values = reference_logps(
                self.model,
                table.dataset,
                table.missing_reference(),
                self.accelerator,
                self.cfg.per_device_eval_batch_size,
                desc=f"reference ({name})",
            )
            table.set_reference(values)
            logger.info("reference log-probs of %d %s clips computed", len(values), name)

    def refresh_pairs(self, step: int) -> bool:
        """The pair refresh due at ``step``, logged; whether a stop signal interrupted it (it is then done first
        when the run resumes, so the resumed run trains on the pairs the uninterrupted one had)."""
        try:
            metrics = self.refresher(self.model, step, stop=self.stop_agreed)
        except EvaluationStopped:
            logger.warning("step %d: the pair refresh was stopped by a stop signal; it runs first on resume", step)
            self.pending_refresh = step
            return True
        self.pending_refresh = None
        self.log.write(step, metrics)
        return False

    def save_checkpoint(self) -> Path:
        record = self.state.record(self.accelerator, self.total_steps, self.settings)
        keep = None
        record["regression_over_limit"] = self.guard.over_limit
        record["pending_refresh"] = self.pending_refresh
        record["bad_samples"] = self.bad_samples.total
        if self.selection is not None:
            record["best"] = self.selection.best.record()
            keep = self.selection.best.checkpoint
        return save_checkpoint(self.accelerator, self.output_dir, record, self.cfg.save_total_limit, keep=keep)

    # ----------------------------------------------------------------------------------------------
    # finish

    def finish(self, stopped_at: Path | None) -> dict[str, float]:
        """Stopped by a signal: say how to resume. Else: the model is saved first (a failing or stopped final
        evaluation never costs the training), then the final evaluation, its results and the plot."""
        accelerator = self.accelerator
        if stopped_at is not None:
            self.say_stopped(
                f"after optimizer step {self.state.global_step} of {self.total_steps}; checkpoint saved in "
                f"{stopped_at}.\nTo resume: {resume_command(self.output_dir, accelerator.num_processes)}"
            )
            accelerator.end_training()
            return {}
        self.save_model(merge=False)  # before the final evaluation: a failing or stopped one never costs it
        results = {}
        if self.test_loader is not None:
            try:
                results = self.final_evaluation()
            except EvaluationStopped:
                self.save_model()
                self.say_stopped(
                    f"during the final evaluation; training is complete and the model is saved in {self.output_dir}."
                    f"\nTo evaluate it: whisper-orpo evaluate --model {shlex.quote(str(self.output_dir))} "
                    f"--data {shlex.quote(str(self.cfg.test_data))}"
                )
                accelerator.end_training()
                return {}
        if self.cfg.peft != "none":
            self.save_model()  # the merged model, now that nothing evaluates the adapter model any more
        if accelerator.is_main_process:
            plot_training_curves(self.output_dir)
        # Every process leaves together: one that tears the process group down while another still writes
        # aborted under ZeRO-3 after the best checkpoint's state was loaded back ("terminate called ...").
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return results

    def save_model(self, merge: bool = True) -> None:
        """The model as it is now, in output_dir (Hugging Face format). With PEFT and ``merge=False``, only the
        adapter: merging changes the model in place, so the merged model waits until nothing evaluates it."""
        self.accelerator.wait_for_everyone()
        final_whisper = consolidated_whisper(self.accelerator, self.model)  # every process: ZeRO-3 gathers weights
        if not self.accelerator.is_main_process:
            return
        if self.cfg.peft != "none" and not merge:
            save_adapter(final_whisper, self.output_dir)
        else:
            save_final_model(final_whisper, self.processor, self.output_dir)

    def final_evaluation(self) -> dict[str, float]:
        """The final model's evaluation, logged and written to eval_results.json. With ``load_best_model_at_end``
        and an earlier checkpoint better than the final weights, that checkpoint becomes the final model and is
        evaluated in its place."""
        step = self.state.global_step
        results = self.evaluate(compare_beams=True, stop=self.stop_agreed)
        self.log.write(step, results)
        over_limit = self.guard.rose_too_far(step, results)
        if self.selection is not None:
            # the final weights are a candidate too (unless the forgetting guard rules them out)
            self.selection.update(step, results, None, candidate=not (over_limit and self.guard.exclude))
            results = self.load_best(results)
        if self.accelerator.is_main_process:
            self.write_results(results)
        return results

    def load_best(self, results: dict[str, float]) -> dict[str, float]:
        """With ``load_best_model_at_end``, the best checkpoint becomes the final model (saved, evaluated again);
        the closing log names the best evaluation either way."""
        best = self.selection.best
        if best.step is None:
            logger.warning(
                "no evaluation was a candidate for the best model (each rose past max_regression, or its %s was not "
                "a number); the final model is the last one",
                best.metric,
            )
            return results
        if self.cfg.load_best_model_at_end and best.checkpoint is not None:
            load_checkpoint(self.accelerator, self.output_dir / best.checkpoint)
            self.save_model(merge=False)
            results = self.evaluate(compare_beams=True, stop=self.stop_agreed)
        logger.info(
            "best %s: %.4g at step %d (%s)%s",
            best.metric,
            best.value,
            best.step,
            best.checkpoint or "the final weights",
            "; the final model is that one" if self.cfg.load_best_model_at_end else "",
        )
        return results

    def write_results(self, results: dict[str, float]) -> None:
        """eval_results.json (metrics, base, per-clip texts, the best model, early stop, forgetting guard) and the
        base-versus-tuned table in the log."""
        extra = {}
        if self.selection is not None:
            extra["best_model"] = self.selection.best.record()
        if self.early_stopped:
            extra["early_stopped"] = self.early_stopped
        if self.regression_eval is not None:
            extra["forgetting_guard"] = self.guard.report()
            extra["regression_samples"] = self.regression_eval.samples()
        write_eval_results(self.output_dir, results, base=self.base_results, samples=self.wer_eval.samples(), **extra)
        if self.base_results:
            logger.info("base vs tuned on %s:\n%s", self.cfg.test_data, format_comparison(self.base_results, results))

    def say_stopped(self, what: str) -> None:
        """The closing message of a run a stop signal ended, in the log and on the console."""
        message = f"Stopped by {self.stop.received or 'a signal on another process'} {what}"
        logger.warning(message)
        if self.accelerator.is_main_process:
            print(message, flush=True)

    def cleanup(self) -> None:
        # an endless stream's loader workers are stopped now, not left to interpreter shutdown (which can hang)
        shutdown_workers = getattr(getattr(self, "stream_batches", None), "_shutdown_workers", None)
        if shutdown_workers is not None:
            shutdown_workers()
        self.stop.restore()
        if self.train_log is not None:
            self.train_log.close()
        self.lock.release()


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run ORPO training as configured; returns the final evaluation metrics (see :meth:`ORPOTrainer.train`)."""
    trainer = ORPOTrainer(cfg)
    try:
        trainer.setup()
        return trainer.train()
    except Exception as err:
        if trainer.train_log is not None and trainer.train_log.handler is not None:
            # into train.log; a check that failed before it opened is reported by the caller alone
            logger.error("training failed: %s: %s", type(err).__name__, err)
        raise
    finally:
        trainer.cleanup()
