"""N-best lists from a Whisper model, and which of its hypotheses are wrong.

``make-pairs`` mines its pairs with them before training, and the trainer's pair refresh
(``refresh_pairs_steps``) mines the errors the model makes during training. Hypotheses come best first by the
model's own score: with beam search (``nbest``) its length-normalised log-prob, otherwise (greedy, or
``sample``: temperature sampling) the average log-prob of the hypothesis tokens. Timestamp tokens are
suppressed: the hypotheses are plain text.

Whether a hypothesis is wrong is decided after Whisper's text normalisation (:class:`Scorer`), so a
hypothesis that differs from the reference only in case or punctuation is never taught as a mistake.
"""

from __future__ import annotations

import jiwer
import torch

from orpo.eval.generate import generate, generation_config
from orpo.eval.text import TextNormalizer, uses_cer

NBEST_MODES = ("nbest", "sample")


def nbest_config(whisper, tokenizer, hypotheses: int, mode: str = "nbest", temperature: float = 1.0):
    """The generation config of ``hypotheses`` hypotheses per clip: the beam search's n-best list (``nbest``), or
    that many samples at ``temperature`` (``sample``: plain temperature sampling, no top-k or top-p)."""
    if mode not in NBEST_MODES:
        raise ValueError(f"mode must be one of {NBEST_MODES}, got {mode!r}")
    if mode == "nbest":
        config = generation_config(whisper, tokenizer, hypotheses, nbest=True, suppress_timestamps=True)
    else:
        config = generation_config(whisper, tokenizer, 1, suppress_timestamps=True)
        config.do_sample, config.temperature, config.top_k, config.top_p = True, temperature, 0, 1.0
        config.num_return_sequences = hypotheses
        config.return_dict_in_generate = True
    config.output_logits = config.num_beams == 1  # no beam scores: the hypotheses' own log-probs score them
    return config


def average_token_logprobs(out, prefix_length: int, eos_token_id: int) -> torch.Tensor:
    """(N,) average log-prob of each generated hypothesis, ``<|endoftext|>`` included, from ``generate``'s raw
    per-step logits (one step at a time: no (N, steps, vocabulary) tensor is built)."""
    generated = out.sequences[:, prefix_length:]
    total = torch.zeros(generated.shape[0], dtype=torch.float64, device=generated.device)
    counted = torch.zeros_like(total)
    finished = torch.zeros(generated.shape[0], dtype=torch.bool, device=generated.device)
    for step, logits in enumerate(out.logits):
        token = generated[:, step]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None]).squeeze(-1)
        total += torch.where(finished, 0.0, logp.double())
        counted += (~finished).double()
        finished |= token == eos_token_id
    return total / counted.clamp(min=1)


def nbest_hypotheses(
    whisper, features: torch.Tensor, prefix: torch.Tensor, tokenizer, config, max_length: int, accelerator=None
) -> list[list[tuple[str, float]]]:
    """For each clip of a batch, its hypotheses as (text, score), best first (ties keep the decoder's order)."""
    out = generate(whisper, features, prefix, config, max_length, accelerator)
    texts = tokenizer.batch_decode(out.sequences[:, prefix.shape[1] :], skip_special_tokens=True)
    if config.num_beams > 1:
        scores = out.sequences_scores.tolist()
    else:
        scores = average_token_logprobs(out, prefix.shape[1], tokenizer.eos_token_id).tolist()
    n = config.num_return_sequences or 1
    lists = []
    for clip in range(features.shape[0]):
        group = zip(scores[clip * n : (clip + 1) * n], range(n), texts[clip * n : (clip + 1) * n])
        lists.append([(text.strip(), score) for score, _, text in sorted(group, key=lambda t: (-t[0], t[1]))])
    return lists


class Scorer:
    """Normalise as Whisper does and measure error rates (WER, or CER for unspaced languages).

    After Whisper's normaliser (that of :mod:`orpo.eval.text`), words without a letter or digit are
    dropped: ``EnglishTextNormalizer`` turns a trailing "..." into a stray "." word, which is not a
    transcription mistake and must not make a hypothesis "wrong".
    """

    def __init__(self):
        self._normalize = TextNormalizer()
        self.uses_cer = uses_cer

    def normalize(self, text: str, language: str | None) -> str:
        normalized = self._normalize(text, language)
        if self.uses_cer(language):
            return normalized
        return " ".join(w for w in normalized.split() if any(c.isalnum() for c in w))

    def error_rate(self, reference: str, hypothesis: str, language: str | None) -> tuple[str, float]:
        kind = "cer" if self.uses_cer(language) else "wer"
        ref, hyp = self.normalize(reference, language), self.normalize(hypothesis, language)
        if not ref:
            return kind, 0.0 if not hyp else 1.0
        return kind, float(jiwer.cer(ref, hyp) if kind == "cer" else jiwer.wer(ref, hyp))

    def wrong_hypotheses(self, reference: str, hypotheses: list[str], language: str | None, keep: int) -> list[str]:
        """Up to ``keep`` hypotheses (best first) that differ from the reference and from each other after
        normalisation; empty hypotheses never count."""
        ref = self.normalize(reference, language)
        seen, wrong = {ref}, []
        for hypothesis in hypotheses:
            norm = self.normalize(hypothesis, language)
            if not hypothesis.strip() or norm in seen:
                continue
            seen.add(norm)
            wrong.append(hypothesis.strip())
            if len(wrong) == keep:
                break
        return wrong
