"""Text normalisation and error rates: WER for space-delimited languages, CER for the others.

References and hypotheses are normalised as Whisper's authors do: English with ``EnglishTextNormalizer``
(British-to-American spellings included, :mod:`orpo.data.spelling`), other languages with
``BasicTextNormalizer``. Languages written without spaces between words (Chinese, Japanese, Thai, ...)
are scored by character error rate (whitespace removed). Both rates are corpus-level: total edits over
total reference words (characters).
"""

from __future__ import annotations

from orpo.config import language_code
from orpo.data.normalize import CER_LANGUAGES, TextNormalizer


def uses_cer(language: str | None) -> bool:
    """True for languages written without spaces between words (scored by character error rate)."""
    return language is not None and language_code(language) in CER_LANGUAGES


def wer_metrics(
    references: list[str],
    hypotheses: list[str],
    languages: list[str | None],
    english_spelling: dict[str, str] | None = None,
) -> dict[str, float]:
    """Corpus WER over clips in space-delimited languages and CER over the others, after normalisation.

    ``languages`` holds a Whisper language name or code per clip (None: English). Returns ``{"wer": ...}``
    and/or ``{"cer": ...}``: a key is present when its clips have at least one reference word (character).
    """
    import jiwer

    if not (len(references) == len(hypotheses) == len(languages)):
        raise ValueError(f"{len(references)} references, {len(hypotheses)} hypotheses, {len(languages)} languages")
    normalize = TextNormalizer(english_spelling)
    pairs: dict[str, tuple[list[str], list[str]]] = {"wer": ([], []), "cer": ([], [])}
    for reference, hypothesis, language in zip(references, hypotheses, languages):
        kind = "cer" if uses_cer(language) else "wer"
        pairs[kind][0].append(normalize(reference, language))
        pairs[kind][1].append(normalize(hypothesis, language))
    metrics = {}
    for kind, (refs, hyps) in pairs.items():
        if not refs:
            continue
        out = (jiwer.process_characters if kind == "cer" else jiwer.process_words)(refs, hyps)
        total = out.substitutions + out.deletions + out.hits
        if total:
            metrics[kind] = (out.substitutions + out.deletions + out.insertions) / total
    return metrics
