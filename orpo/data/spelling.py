"""Whisper's British-to-American spelling table, for the English text normaliser.

``english_spelling.json`` is OpenAI Whisper's ``whisper/normalizers/english.json`` (MIT licence), the file
hub checkpoints ship as ``normalizer.json``. A tokenizer loaded from a directory without it (a converted
model, a local copy) has no table, so it is bundled here; saved models get it as ``normalizer.json``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

ENGLISH_SPELLING_FILE = Path(__file__).with_name("english_spelling.json")


@lru_cache(maxsize=1)
def english_spelling_mapping() -> dict[str, str]:
    return json.loads(ENGLISH_SPELLING_FILE.read_text(encoding="utf-8"))
