"""Pairs refreshed from the model being trained (``refresh_pairs_steps``): on-policy rejected transcripts.

Once the model stops making the mistakes of the manifest, those rejected transcripts teach it little; the errors it
makes now go unseen. So every ``refresh_pairs_steps`` optimizer steps the model as it is then (in eval mode: no
dropout, no SpecAugment) decodes ``refresh_clips`` training clips (all by default; drawn without replacement from
the seed and the step) on their clean audio (no augmentation): beam search's n-best list (``refresh_mode:
nbest``) or ``refresh_num_beams`` samples (``sample``). The hypotheses that differ from the clip's chosen
transcript after Whisper's normaliser become its rejected transcripts, hardest (best-scored) first, up to
``refresh_num_rejected``; with ``refresh_keep_manifest_rejected`` the manifest's follow them. A clip whose
hypotheses all equal its chosen transcript keeps the rejected transcripts it had.

Each process decodes its own disjoint share of the clips (the same number of batches on each, in step under
ZeRO-3); the hypotheses are gathered, so every process makes the same changes to its
:class:`orpo.data.pair_table.PairTable`, and a digest of the table is compared across processes (a difference is
an error, never trained on). For DPO and IPO the changed clips get their reference log-probs at once, from the
same network with its adapters off (:mod:`orpo.eval.reference`).

Cost: one generation pass over ``refresh_clips`` clips at ``refresh_num_beams`` hypotheses each (about one
evaluation pass over that many clips at that beam width), plus for DPO and IPO one forward without grad per changed
clip. Logged at the step: ``refresh/clips_decoded``, ``refresh/clips_changed``, ``refresh/wer`` (the best
hypothesis's corpus WER on the decoded clips, an on-policy training WER; ``refresh/cer`` for languages written
without spaces) and ``refresh/seconds``. Each refresh's pairs go to ``output_dir/pairs/step-N.jsonl`` (manifest
records: the trainer reads such a file as training data).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from orpo.data.collate import MODEL_INPUTS, GenerationCollator
from orpo.data.pair_table import PairTable
from orpo.eval.generate import (
    restore_training_modes,
    stop_between_batches,
    training_modes,
    whisper_for_generation,
)
from orpo.eval.nbest import Scorer, nbest_config, nbest_hypotheses
from orpo.eval.reference import reference_logps
from orpo.eval.text import wer_metrics
from orpo.files import staged_file
from orpo.scale.launch import unwrap_model
from orpo.scale.shards import process_share
from orpo.train.state import batch_seed

logger = logging.getLogger("orpo")

PAIRS_FOLDER = "pairs"


def pairs_file(output_dir: Path, step: int) -> Path:
    """Where the pairs of the refresh at ``step`` are kept for audit."""
    return Path(output_dir) / PAIRS_FOLDER / f"step-{step}.jsonl"


class PairRefresher:
    """The refresh of a run: which clips at which step, their decoding, and the table's update."""

    def __init__(self, cfg, table: PairTable, accelerator, needs_reference: bool, output_dir: Path):
        self.cfg = cfg
        self.table = table
        self.accelerator = accelerator
        self.needs_reference = needs_reference
        self.output_dir = Path(output_dir)
        self.scorer = Scorer()

    def due(self, step: int) -> bool:
        return self.cfg.refresh_pairs_steps > 0 and step % self.cfg.refresh_pairs_steps == 0

    def clips(self, step: int) -> list[int]:
        """The clips the refresh at ``step`` decodes: all, or ``refresh_clips`` of them drawn from (seed, step)."""
        count = len(self.table)
        wanted = self.cfg.refresh_clips or count
        if wanted >= count:
            return list(range(count))
        generator = np.random.default_rng([self.cfg.seed % 2**63, step])
        return sorted(generator.choice(count, size=wanted, replace=False).tolist())

    def __call__(self, model: torch.nn.Module, step: int, stop: Callable[[], bool] | None = None) -> dict:
        """Refresh the table at ``step``; the metrics to log. ``stop`` ends the decoding between batches with
        :class:`orpo.eval.generate.EvaluationStopped`, before anything changed."""
        start = time.perf_counter()
        indices = self.clips(step)
        hypotheses = self.decode(model, indices, step, stop)
        changed = self.update(hypotheses)
        if self.needs_reference and changed:
            values = reference_logps(
                model,
                self.table.dataset,
                changed,
                self.accelerator,
                self.cfg.per_device_eval_batch_size,
                desc=f"reference (step {step})",
            )
            self.table.set_reference(values)
        self.check_agreement(step)
        self.table.refreshed_at = step
        if self.accelerator.is_main_process:
            with staged_file(pairs_file(self.output_dir, step)) as staging, staging.open("w", encoding="utf-8") as f:
                for record in self.table.manifest_records():  # one line at a time: a corpus may have millions
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        metrics = {"refresh/clips_decoded": float(len(indices)), "refresh/clips_changed": float(len(changed))}
        metrics |= self.error_rates(hypotheses)
        metrics["refresh/seconds"] = time.perf_counter() - start
        logger.info(
            "step %d: pairs refreshed: %d clips decoded, %d with new rejected transcripts (%.1f s)",
            step,
            len(indices),
            len(changed),
            metrics["refresh/seconds"],
        )
        return metrics

    def decode(self, model, indices: list[int], step: int, stop) -> dict[int, list[tuple[str, float]]]:
        """Every clip's hypotheses, best first, on every process (each decodes its share, then all are gathered)."""
        cfg, accelerator = self.cfg, self.accelerator
        whisper = whisper_for_generation(model, accelerator)
        one_pass = unwrap_model(model, accelerator)  # featurises waveforms with features_on_device
        tokenizer = self.table.dataset.tokens.tokenizer
        config = nbest_config(whisper, tokenizer, cfg.refresh_num_beams, cfg.refresh_mode, cfg.refresh_temperature)
        clean = self.table.dataset.without_augmentation()
        loader = DataLoader(
            Subset(clean, process_share(indices, accelerator)),
            batch_size=cfg.per_device_eval_batch_size,
            collate_fn=GenerationCollator(clean),
        )
        device = accelerator.device
        modes = training_modes(whisper)
        whisper.eval()
        local = []
        try:
            # sampling draws from (seed, step, process): a resumed run decodes what the uninterrupted one did
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                torch.manual_seed(batch_seed(cfg.seed, step, 0, accelerator.process_index))
                with torch.no_grad(), accelerator.autocast():
                    for batch in tqdm(
                        loader,
                        desc=f"refresh pairs (step {step})",
                        leave=False,
                        disable=not accelerator.is_local_main_process,
                    ):
                        stop_between_batches(stop)
                        inputs = {name: batch[name].to(device) for name in MODEL_INPUTS if name in batch}
                        lists = nbest_hypotheses(
                            whisper,
                            one_pass.input_features(inputs),
                            batch["decoder_input_ids"],
                            tokenizer,
                            config,
                            cfg.generation_max_length,
                            accelerator,
                        )
                        local += list(zip(batch["sample_index"].tolist(), lists))
        finally:
            restore_training_modes(modes)
        gathered = gather_object(local) if accelerator.num_processes > 1 else local
        return dict(gathered)

    def update(self, hypotheses: dict[int, list[tuple[str, float]]]) -> list[int]:
        """The table with each decoded clip's wrong hypotheses as its rejected transcripts; the clips that changed."""
        cfg, table = self.cfg, self.table
        changed = []
        for index in sorted(hypotheses):
            item = table.dataset.items[index]
            texts = [text for text, _ in hypotheses[index]]
            language = item.language_code
            wrong = self.scorer.wrong_hypotheses(item.sample.chosen, texts, language, cfg.refresh_num_rejected)
            if not wrong:
                continue  # every hypothesis is right: the clip keeps the rejected transcripts it has
            if cfg.refresh_keep_manifest_rejected:
                seen = {self.scorer.normalize(text, language) for text in wrong}
                manifest = table.manifest_rejected(index)
                wrong += [text for text in manifest if self.scorer.normalize(text, language) not in seen]
            if wrong != table.rejected(index):
                table.replace_rejected(index, wrong)
                changed.append(index)
        return changed

    def error_rates(self, hypotheses: dict[int, list[tuple[str, float]]]) -> dict[str, float]:
        """``refresh/wer`` (``refresh/cer``) of the best hypotheses against the chosen transcripts."""
        items = [self.table.dataset.items[index] for index in sorted(hypotheses)]
        best = [hypotheses[index][0][0] if hypotheses[index] else "" for index in sorted(hypotheses)]
        rates = wer_metrics([item.sample.chosen for item in items], best, [item.language_code for item in items])
        return {f"refresh/{kind}": value for kind, value in rates.items()}

    def check_agreement(self, step: int) -> None:
        """Every process holds the same pairs after the refresh; else the run stops before training on them."""
        if self.accelerator.num_processes == 1:
            return
        digests = gather_object([self.table.digest()])
        if len(set(digests)) > 1:
            raise RuntimeError(
                f"step {step}: after the pair refresh the processes hold different pairs (digests {digests}); "
                "training on them would not be one run. Please report this with the run's train.log."
            )
