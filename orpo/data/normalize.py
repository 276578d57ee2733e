"""Whisper's text normalisers by language, as its authors score: ``EnglishTextNormalizer`` for English
(British-to-American spellings included, :mod:`orpo.data.spelling`), ``BasicTextNormalizer`` for the rest,
whitespace removed for languages written without spaces. The data checks (a pair whose two sides read the same)
and the error rates (:mod:`orpo.eval.text`) share it.
"""

from __future__ import annotations

from orpo.config import language_code
from orpo.data.spelling import english_spelling_mapping

# Whisper language codes of languages written without spaces between words: scored by CER.
# (Chinese, Japanese, Korean, Thai, Lao, Burmese, Khmer, Cantonese, Tibetan.)
CER_LANGUAGES = frozenset({"zh", "ja", "ko", "th", "lo", "my", "km", "yue", "bo"})


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
