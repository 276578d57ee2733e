"""The one builder of Whisper decoder token sequences: training, generation, export checks and make-pairs use it.

Multilingual prefix: ``<|startoftranscript|><|lang|><|task|><|notimestamps|>``; English-only (.en)
models were trained without language and task tokens, so theirs is ``<|startoftranscript|><|notimestamps|>``.
"""

from __future__ import annotations

import math

from orpo.config import language_code
from orpo.data.schema import MAX_TIMESTAMP, TIMESTAMP_STEP, Segment


def is_multilingual(model_config) -> bool:
    """English-only (.en) checkpoints have a 51,864-token vocabulary; multilingual ones more."""
    return model_config.vocab_size >= 51865


class WhisperTokens:
    """Builds Whisper decoder token sequences: prefix + transcript + <|endoftext|>.

    Multilingual prefix: ``<|startoftranscript|><|lang|><|task|><|notimestamps|>``; English-only
    (.en) models were trained without language and task tokens, so theirs is
    ``<|startoftranscript|><|notimestamps|>``. Text is encoded with a leading space, as Whisper
    itself writes the first word after the prefix.

    With ``timestamps`` the prefix has no ``<|notimestamps|>`` and a transcript given as segments is
    ``<|t0|> text <|t1|><|t2|> text <|t3|>...``: each segment's start and end as timestamp tokens
    (times rounded to the nearest 0.02 s), its text with a leading space in between.
    """

    def __init__(self, tokenizer, multilingual: bool, task: str, timestamps: bool, max_length: int):
        self.tokenizer = tokenizer
        self.multilingual = multilingual
        self.task = task
        self.timestamps = timestamps
        self.max_length = max_length
        self.eot = self._special("<|endoftext|>")
        self.sot = self._special("<|startoftranscript|>")
        self._timestamp_ids: dict[int, int] = {}

    def _special(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or self.tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ValueError(f"the tokenizer has no {token} token; is it a Whisper tokenizer?")
        return token_id

    @classmethod
    def for_model(cls, tokenizer, model_config, task: str = "transcribe", timestamps: bool = False) -> "WhisperTokens":
        """Tokens for a model: multilingual or not from its vocabulary, its decoder's length limit."""
        return cls(tokenizer, is_multilingual(model_config), task, timestamps, model_config.max_target_positions)

    def prefix(self, language: str | None, timestamps: bool | None = None) -> list[int]:
        """The decoder prefix; ``timestamps`` (default: this builder's setting) False ends it with <|notimestamps|>."""
        timestamps = self.timestamps if timestamps is None else timestamps
        ids = [self.sot]
        if self.multilingual:
            if language is None:
                raise ValueError("multilingual model: set 'language' in the recipe or in each manifest record")
            ids += [self._special(f"<|{language_code(language)}|>"), self._special(f"<|{self.task}|>")]
        if not timestamps:
            ids.append(self._special("<|notimestamps|>"))
        return ids

    def text(self, text: str) -> list[int]:
        return self.tokenizer(" " + text.strip(), add_special_tokens=False).input_ids

    def timestamp(self, seconds: float) -> int:
        """Id of the timestamp token nearest to ``seconds``: ``<|0.00|>``, ``<|0.02|>``, ... ``<|30.00|>``."""
        index = math.floor(seconds / TIMESTAMP_STEP + 0.5)
        if not 0 <= index <= round(MAX_TIMESTAMP / TIMESTAMP_STEP):
            raise ValueError(f"time {seconds} s is outside Whisper's timestamps (0 to {MAX_TIMESTAMP:.0f} s)")
        if index not in self._timestamp_ids:
            self._timestamp_ids[index] = self._special(f"<|{index * TIMESTAMP_STEP:.2f}|>")
        return self._timestamp_ids[index]

    def transcript(self, transcript: str | list[Segment]) -> list[int]:
        """Token ids of a transcript: plain text, or segments with their timestamp tokens."""
        if isinstance(transcript, str):
            return self.text(transcript)
        ids = []
        for segment in transcript:
            ids += [self.timestamp(segment.start), *self.text(segment.text), self.timestamp(segment.end)]
        return ids

    def sequence(self, language: str | None, transcript: str | list[Segment]) -> tuple[list[int], int]:
        """Full token sequence and the number of prefix tokens in it."""
        prefix = self.prefix(language)
        return prefix + self.transcript(transcript) + [self.eot], len(prefix)
