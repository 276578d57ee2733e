"""Evaluate a model a run left behind: WER/CER of generated transcripts and the ORPO preference metrics.

Settings the command line leaves open (language, task, alpha, timestamps, prompt loss, dataset columns)
come from the run's ``config.yaml`` when the model directory is (in) a training output_dir. The results go
to ``--out``, else into the evaluated model's folder as ``eval_DATA.json`` (never the current directory).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from torch.utils.data import DataLoader

from orpo.artifacts.run_model import load_model, run_config
from orpo.config import EvaluateConfig
from orpo.data.collate import PreferenceCollator
from orpo.data.dataset import DATASET_KEYS, PreferenceDataset, load_samples
from orpo.data.manifest import is_manifest
from orpo.data.tokens import WhisperTokens
from orpo.eval.preference import preference_metrics
from orpo.eval.report import format_comparison, write_eval_results
from orpo.eval.wer import WerEvaluator
from orpo.loss.objective import Objective
from orpo.model.orpo_whisper import ORPOWhisper
from orpo.scale.launch import build_accelerator

logger = logging.getLogger("orpo")


def default_results_path(model_dir: Path, data: str, split: str) -> Path:
    """``MODEL/eval_STEM.json`` for a manifest, ``MODEL/eval_NAME_SPLIT.json`` for a Hugging Face dataset: beside
    the evaluated weights, named after the data (a run's own ``eval_results.json`` is never overwritten)."""
    name = Path(data).stem if is_manifest(data) else f"{Path(data.rstrip('/')).name}_{split}"
    name = re.sub(r"[^\w.-]+", "_", name).strip("_") or "data"
    return model_dir / f"eval_{name}.json"


def evaluate_model(cfg: EvaluateConfig) -> None:
    """Score ``cfg.model`` on ``cfg.data``; print the table and write the results (:func:`default_results_path`
    unless ``cfg.out`` names the file)."""

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = build_accelerator()
    model_dir = Path(cfg.model)
    run = run_config(model_dir)  # the run's resolved recipe, when DIR is (in) a training output_dir
    alpha = cfg.alpha if cfg.alpha is not None else float(run.get("alpha", 0.1))
    # A bad manifest stops here, before any weights load.
    samples = load_samples(
        cfg.data,
        cfg.split,
        **{key: run[key] for key in DATASET_KEYS if key in run},
        duration_tolerance=cfg.duration_tolerance,
    )
    whisper, processor, source = load_model(model_dir, cfg.base_model)
    whisper.to(accelerator.device).eval()
    # Scored as the run scored its eval set: its timestamps setting (then the data needs segments) and prompt loss.
    tokens = WhisperTokens.for_model(
        processor.tokenizer, whisper.config, cfg.task or run.get("task") or "transcribe", bool(run.get("timestamps"))
    )
    dataset = PreferenceDataset(
        samples, processor.feature_extractor, tokens, cfg.language or run.get("language"), 0.0, cfg.max_audio_len
    )
    if accelerator.is_main_process:
        logger.info("evaluating %s on %d clips", source, len(dataset))
    loader = accelerator.prepare(
        DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=PreferenceCollator(pad_token_id=tokens.eot))
    )
    orpo_model = ORPOWhisper(whisper, disable_prompt_loss=bool(run.get("disable_prompt_loss", True)))
    # ORPO's preference metrics whatever the run's loss_type: reference-free, so any two models compare
    metrics = preference_metrics(orpo_model, loader, accelerator, Objective(alpha=alpha))
    evaluator = WerEvaluator(dataset, accelerator, cfg.batch_size, cfg.num_beams, cfg.max_length)
    metrics = {**evaluator(whisper), **metrics}
    if accelerator.is_main_process:
        print(format_comparison(None, metrics))
        print(", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        out = Path(cfg.out) if cfg.out else default_results_path(model_dir, cfg.data, cfg.split)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_eval_results(
            out.parent,
            metrics,
            samples=evaluator.samples(),
            name=out.name,
            model=str(model_dir),
            model_source=source,
            data=str(cfg.data),
            num_beams=cfg.num_beams,
            max_length=cfg.max_length,
            alpha=alpha,
        )
        print(f"wrote {out}")
    accelerator.wait_for_everyone()
