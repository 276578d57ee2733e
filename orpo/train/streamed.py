"""The training side of ``streaming: true``: the stateful loader over the stream, and the bad samples it reports.

A stream cannot be checked before training (:mod:`orpo.data.stream`). Its batches bring the records of the
samples the stream skipped on the way; :class:`BadSamples` settles them at every optimizer step, on every process
alike: one all-reduce tells whether any process has new ones, and only then are they gathered, logged, listed
in ``output_dir/bad_samples.jsonl`` and counted against ``max_bad_samples`` (one more stops the run, naming it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from accelerate.utils import gather_object

from orpo.data.augment import Augmenter
from orpo.data.collate import PreferenceCollator
from orpo.data.hf import open_stream
from orpo.data.stream import StreamedPreferences
from orpo.errors import ManifestError
from orpo.files import write_text_atomic

logger = logging.getLogger("orpo")

BAD_SAMPLES_FILE = "bad_samples.jsonl"


def stream_loader(cfg, processor, tokens, accelerator, worker_init_fn=None):
    """The streamed training set and its ``torchdata`` StatefulDataLoader (each process reads its own part)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    source, label, base = open_stream(cfg.train_data, cfg.train_split, cfg.dataset_config)
    settings = {
        "seed": cfg.seed,
        "shuffle_buffer": cfg.shuffle_buffer,
        "batch_size": cfg.per_device_train_batch_size,
        "group_by_length": cfg.group_by_length,
        "min_len": cfg.min_audio_len,
        "max_len": cfg.max_audio_len,
        "language": cfg.language,
        "raw_audio": bool(cfg.features_on_device),
        "columns": {
            "audio": cfg.audio_column,
            "chosen": cfg.chosen_column,
            "rejected": cfg.rejected_column,
            "language": cfg.language_column,
        },
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
    }
    augment = None
    if cfg.augment_config_path:
        augment = Augmenter.from_file(cfg.augment_config_path, seed=cfg.seed, timestamps=cfg.timestamps)
    dataset = StreamedPreferences(source, label, base, settings, tokens, processor.feature_extractor, augment)
    loader = StatefulDataLoader(
        dataset,
        batch_size=cfg.per_device_train_batch_size,
        collate_fn=PreferenceCollator(pad_token_id=tokens.eot),
        num_workers=cfg.num_workers,
        worker_init_fn=worker_init_fn,
    )
    logger.info("training data: %s, read as a stream", label)
    return dataset, loader


class BadSamples:
    """The bad samples a streamed run met, their count, their file."""

    def __init__(self, limit: int, output_dir: Path, accelerator, total: int = 0):
        self.limit = limit
        self.path = Path(output_dir) / BAD_SAMPLES_FILE
        self.accelerator = accelerator
        self.total = total
        self.new: list[dict] = []

    def resume(self, total: int, step: int) -> None:
        """A resumed run's count, and its file without the records of steps after the checkpoint (the resumed run
        meets those samples again)."""
        self.total = total
        if self.accelerator.is_main_process and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def take(self, batch: dict) -> dict:
        """The batch without its stream records: bad samples kept until the step settles, dropped clips logged."""
        self.new += batch.pop("bad_samples", [])
        for source in batch.pop("dropped", []):
            logger.info("dropped %s: outside [min_audio_len, max_audio_len]", source)
        return batch

    def settle(self, step: int, any_new: bool) -> None:
        """At an optimizer step (every process): ``any_new`` (from the step's all-reduce) says whether a process
        met bad samples; if so they are gathered, logged, written and counted; past ``max_bad_samples`` the run
        stops with the first of them."""
        if not any_new:
            return
        records = gather_object(self.new) if self.accelerator.num_processes > 1 else self.new
        self.new = []
        self.total += len(records)
        if self.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps({"step": step, **record}, ensure_ascii=False) + "\n")
            for record in records:
                logger.warning("step %d: bad sample skipped: %s: %s", step, record["source"], record["reason"])
        if self.total > self.limit:
            first = records[0]
            raise ManifestError(
                f"{first['reason']} (a bad sample in the stream: {self.total} in all, max_bad_samples: {self.limit}). "
                f"Fix or remove it, or raise max_bad_samples to skip such samples (each is listed in {self.path})"
            )
