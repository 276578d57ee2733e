"""The closing quality table of a run: base and tuned model, greedy and beam search, and, with
``compare_sft``, the same recipe trained with ``alpha: 0`` (plain fine-tuning on the chosen transcripts).

Plain fine-tuning is the baseline the preference term must beat; it runs after the tuned run, in the same
processes, from the same base model, data, steps and seed, into ``output_dir/sft-baseline``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from accelerate import PartialState

from orpo.config import TrainConfig
from orpo.eval.report import add_to_eval_results, format_quality_table, quality_rows
from orpo.loss.objective import Objective
from orpo.train.loop import train

logger = logging.getLogger(__name__)

SFT_FOLDER = "sft-baseline"


def sft_config(cfg: TrainConfig) -> TrainConfig:
    """The recipe as ORPO with the odds-ratio term off (the NLL of the chosen transcripts alone), into its own
    folder, evaluated greedily at the end."""
    return dataclasses.replace(
        cfg,
        loss_type="orpo",
        alpha=0.0,
        refresh_pairs_steps=0,  # the rejected transcripts do not count at alpha 0
        output_dir=str(Path(cfg.output_dir) / SFT_FOLDER),
        resume_from_checkpoint=None,
        overwrite_output_dir=True,  # a baseline left by an earlier attempt moves aside: it restarts from scratch
        eval_before_train=False,
        compare_num_beams=0,
        compare_sft=False,
    )


def train_and_compare(cfg: TrainConfig) -> dict[str, float]:
    """Train as configured; then, when asked, the plain fine-tuning baseline; then the quality table (printed,
    logged and added to ``eval_results.json`` as ``quality_table``). Returns the ORPO run's final metrics."""
    results = train(cfg)
    if not results or not (cfg.compare_sft or cfg.compare_num_beams):
        return results  # stopped by a signal (nothing to compare yet), or no comparison asked for
    sft = train(sft_config(cfg)) if cfg.compare_sft else None
    if PartialState().is_main_process:
        record = json.loads((Path(cfg.output_dir) / "eval_results.json").read_text(encoding="utf-8"))
        tuned_name = Objective.from_config(cfg).describe()
        rows = quality_rows(record.get("base_metrics"), results, sft, tuned_name, cfg.compare_num_beams)
        table = format_quality_table(rows)
        add_to_eval_results(cfg.output_dir, quality_table=rows, quality_table_text=table.splitlines())
        logger.info("quality on %s (same test clips, same training steps):\n%s", cfg.test_data, table)
        print(f"\nQuality on {cfg.test_data}:\n{table}\n", flush=True)
    return results
