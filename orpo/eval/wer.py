"""Generation-based WER/CER on a preference dataset, for the training loop and ``whisper-orpo evaluate``."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader

from orpo.data.collate import GenerationCollator
from orpo.data.dataset import PreferenceDataset
from orpo.eval.generate import generate_transcripts
from orpo.eval.text import wer_metrics


def generation_loader(
    dataset: PreferenceDataset, batch_size: int, num_workers: int = 0, worker_init_fn=None
) -> DataLoader:
    """An unshuffled loader of generation batches over ``dataset`` (prepare it with Accelerate to shard it)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=GenerationCollator(dataset),
        worker_init_fn=worker_init_fn,
    )


class WerEvaluator:
    """Generation-based WER/CER on a :class:`PreferenceDataset`, for the training loop.

    Built once (it prepares its own loader); each call transcribes the whole set with the model as it is
    and returns ``{"eval/wer": ..., "eval/cer": ...}`` (the keys that apply). The texts of the latest
    call with each ``tag`` are kept for :meth:`samples` and :func:`write_eval_results`.
    """

    def __init__(
        self,
        dataset: PreferenceDataset,
        accelerator,
        batch_size: int = 8,
        num_beams: int = 1,
        max_length: int = 225,
        num_workers: int = 0,
        worker_init_fn=None,
    ):
        self.dataset = dataset
        self.tokenizer = dataset.tokens.tokenizer
        self.accelerator = accelerator
        self.num_beams = num_beams
        self.max_length = max_length
        loader = generation_loader(dataset, batch_size, num_workers, worker_init_fn)
        self.loader = accelerator.prepare(loader) if accelerator is not None else loader
        self.languages = [item.language_code for item in dataset.items]
        self.references = [item.sample.chosen for item in dataset.items]
        self.transcripts: dict[str, dict[int, str]] = {}

    @classmethod
    def from_config(cls, cfg, dataset: PreferenceDataset, accelerator, worker_init_fn=None) -> "WerEvaluator":
        return cls(
            dataset,
            accelerator,
            batch_size=cfg.per_device_eval_batch_size,
            num_beams=cfg.generation_num_beams,
            max_length=cfg.generation_max_length,
            num_workers=cfg.num_workers,
            worker_init_fn=worker_init_fn,
        )

    def __call__(
        self,
        model: torch.nn.Module,
        tag: str = "tuned",
        num_beams: int | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> dict[str, float]:
        """WER/CER of the model's transcripts (beam width ``num_beams``, else the evaluator's own); ``stop`` as in
        :func:`orpo.eval.generate.generate_transcripts`."""
        texts = generate_transcripts(
            model,
            self.loader,
            self.accelerator,
            self.tokenizer,
            num_beams or self.num_beams,
            self.max_length,
            desc=f"generate ({tag})",
            stop=stop,
        )
        missing = set(range(len(self.dataset))) - set(texts)
        if missing:
            raise RuntimeError(f"no transcript for clips {sorted(missing)[:10]}")
        self.transcripts[tag] = texts
        hypotheses = [texts[i] for i in range(len(self.dataset))]
        mapping = getattr(self.tokenizer, "english_spelling_normalizer", None)
        return {f"eval/{k}": v for k, v in wer_metrics(self.references, hypotheses, self.languages, mapping).items()}

    def samples(self) -> list[dict]:
        """Per clip: audio path, language, reference and the hypothesis of each tag evaluated."""
        rows = []
        for i, item in enumerate(self.dataset.items):
            audio = str(item.sample.audio_path) if item.sample.audio_path is not None else item.sample.source
            row = {"audio": audio, "language": self.languages[i], "reference": item.sample.chosen}
            for tag, texts in self.transcripts.items():
                row["hypothesis" if tag == "tuned" else f"{tag}_hypothesis"] = texts.get(i)
            rows.append(row)
        return rows
