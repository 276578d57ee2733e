"""The forgetting guard's measurements: how the model transcribes general speech it is not tuned on.

``regression_data`` (plain ASR clips) is transcribed greedily, from each clip's own language prefix, at the
start and at every evaluation: ``regression/wer`` (``regression/cer`` for languages written without spaces),
with several languages also per language (``regression/wer/de``, ...), and with a multilingual model
``regression/language_accuracy``: the share of clips whose language the model itself detects (the most likely
language token after ``<|startoftranscript|>``, as Whisper's own language detection does) as the clip's
``language``. A language being forgotten shows in both.
"""

from __future__ import annotations

from typing import Callable

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from orpo.data.dataset import PreferenceDataset
from orpo.eval.generate import restore_training_modes, stop_between_batches, training_modes, whisper_for_generation
from orpo.eval.text import wer_metrics
from orpo.eval.wer import WerEvaluator

PREFIX = "regression/"


def language_token_ids(tokenizer, vocab_size: int) -> dict[int, str]:
    """{token id: language code} of every Whisper language token the model's vocabulary holds."""
    ids = {}
    for code in LANGUAGES:
        token_id = tokenizer.convert_tokens_to_ids(f"<|{code}|>")
        if (
            isinstance(token_id, int)
            and token_id < vocab_size
            and tokenizer.convert_ids_to_tokens(token_id) == f"<|{code}|>"
        ):
            ids[token_id] = code
    return ids


class RegressionEvaluator:
    """Greedy WER/CER (overall and per language) and language-identification accuracy on ``regression_data``.

    Each call returns ``{"regression/wer": ..., "regression/wer/<code>": ..., "regression/language_accuracy":
    ...}`` (the keys that apply); the transcripts of each tag are kept for :meth:`samples`.
    """

    def __init__(self, dataset: PreferenceDataset, accelerator, wer: WerEvaluator):
        self.dataset = dataset
        self.accelerator = accelerator
        self.wer = wer
        self.languages = sorted(set(wer.languages))
        self.multilingual = dataset.tokens.multilingual

    @classmethod
    def from_config(cls, cfg, dataset: PreferenceDataset, accelerator, worker_init_fn=None) -> "RegressionEvaluator":
        wer = WerEvaluator(
            dataset,
            accelerator,
            batch_size=cfg.per_device_eval_batch_size,
            num_beams=1,
            max_length=cfg.generation_max_length,
            num_workers=cfg.num_workers,
            worker_init_fn=worker_init_fn,
        )
        return cls(dataset, accelerator, wer)

    def __call__(self, model: torch.nn.Module, tag: str = "tuned", stop: Callable[[], bool] | None = None) -> dict:
        rates = self.wer(model, tag=tag, stop=stop)
        metrics = {PREFIX + key.removeprefix("eval/"): value for key, value in rates.items()}
        if len(self.languages) > 1:
            metrics.update(self.per_language(self.wer.transcripts[tag]))
        if self.multilingual:
            metrics[PREFIX + "language_accuracy"] = self.language_accuracy(model, stop)
        return metrics

    def per_language(self, texts: dict[int, str]) -> dict[str, float]:
        """``regression/wer/<code>`` (or ``cer``) of each language's clips."""
        metrics = {}
        mapping = getattr(self.wer.tokenizer, "english_spelling_normalizer", None)
        for code in self.languages:
            clips = [i for i, language in enumerate(self.wer.languages) if language == code]
            references = [self.wer.references[i] for i in clips]
            rates = wer_metrics(references, [texts[i] for i in clips], [code] * len(clips), mapping)
            metrics.update({f"{PREFIX}{kind}/{code}": value for kind, value in rates.items()})
        return metrics

    def detected_languages(self, model: torch.nn.Module, stop: Callable[[], bool] | None = None) -> dict[int, str]:
        """{clip index: the language code the model detects}: one decoder step from ``<|startoftranscript|>``,
        the most likely language token. Every process runs every batch of its shard (ZeRO-3 needs all ranks
        in each forward); the answers are gathered."""
        whisper = whisper_for_generation(model, self.accelerator)
        ids = language_token_ids(self.wer.tokenizer, whisper.config.vocab_size)
        candidates = torch.tensor(sorted(ids))
        modes = training_modes(whisper)
        whisper.eval()
        device = next(whisper.parameters()).device
        local = []
        disable = self.accelerator is not None and not self.accelerator.is_local_main_process
        autocast = (
            self.accelerator.autocast() if self.accelerator is not None else torch.autocast(device.type, enabled=False)
        )
        try:
            with torch.no_grad(), autocast:
                for batch in tqdm(self.wer.loader, desc="detect language", leave=False, disable=disable):
                    stop_between_batches(stop)
                    features = batch["input_features"].to(device=device, dtype=whisper.get_encoder().conv1.weight.dtype)
                    start = batch["decoder_input_ids"][:, :1].to(device)
                    logits = whisper(input_features=features, decoder_input_ids=start).logits[:, -1]
                    best = candidates[logits[:, candidates.to(device)].argmax(dim=-1).cpu()]
                    local += [(int(i), ids[int(t)]) for i, t in zip(batch["sample_index"].tolist(), best.tolist())]
        finally:
            restore_training_modes(modes)
        several = self.accelerator is not None and self.accelerator.num_processes > 1
        return dict(sorted(gather_object(local) if several else local))

    def language_accuracy(self, model: torch.nn.Module, stop: Callable[[], bool] | None = None) -> float:
        detected = self.detected_languages(model, stop)
        right = sum(detected[i] == language for i, language in enumerate(self.wer.languages))
        return right / len(self.wer.languages)

    def samples(self) -> list[dict]:
        """Per clip: audio, language, reference and each tag's hypothesis (as :meth:`WerEvaluator.samples`)."""
        return self.wer.samples()
