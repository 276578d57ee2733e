"""Text normalisation and error rates: WER for space-delimited languages, CER for the others.

References and hypotheses are normalised as Whisper's authors do: English with ``EnglishTextNormalizer``
(British-to-American spellings included, :mod:`orpo.data.spelling`), other languages with
``BasicTextNormalizer``. Languages written without spaces between words (Chinese, Japanese, Thai, ...)
are scored by character error rate (whitespace removed). Both rates are corpus-level: total edits over
total reference words (characters).
"""

from __future__ import annotations

from orpo.config import language_code
from orpo.data.spelling import english_spelling_mapping

# Whisper language codes of languages written without spaces between words: scored by CER.
# (Chinese, Japanese, Korean, Thai, Lao, Burmese, Khmer, Cantonese, Tibetan.)
CER_LANGUAGES = frozenset({"zh", "ja", "ko", "th", "lo", "my", "km", "yue", "bo"})


def uses_cer(language: str | None) -> bool:
    """True for languages written without spaces between words (scored by character error rate)."""
    return language is not None and language_code(language) in CER_LANGUAGES


class TextNormalizer:
    """Whisper's normalisers by language: English for 'en' (and no language), basic for the rest."""

    def __init__(self, english_spelling: dict[str, str] | None = None):
        from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

        self.english = EnglishTextNormalizer(english_spelling or english_spelling_mapping())
        self.basic = BasicTextNormalizer()

    def __call__(self, text: str, language: str | None) -> str:
        code = language_code(language) if language else "en"
        normalized = self.english(text) if code == "en" else self.basic(text)
        if code in CER_LANGUAGES:
            return "".join(normalized.split())
        return " ".join(normalized.split())


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
