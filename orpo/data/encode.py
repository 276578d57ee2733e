"""A checked preference sample tokenised for training: its pairs differ, every transcript fits the decoder.

The one place a :class:`~orpo.data.schema.PreferenceSample` becomes token sequences: the datasets, the manifest
index (:mod:`orpo.data.index`, in its checking processes) and the pair refresh all encode through
:func:`encode_sample`.
"""

from __future__ import annotations

from dataclasses import dataclass

from orpo.config import language_code
from orpo.data.normalize import TextNormalizer
from orpo.data.schema import PreferenceSample, Segment
from orpo.data.tokens import WhisperTokens
from orpo.errors import ManifestError


@dataclass
class EncodedSample:
    sample: PreferenceSample
    segments: list[tuple[list[int], int]]  # (tokens, prefix length): chosen first, then rejected
    language: str | None  # the language of its prefix: its own, else the default (multilingual models only)

    @property
    def language_code(self) -> str:
        """The clip's language code for scoring ('en' when neither the clip nor the model names one)."""
        return language_code(self.language) if self.language else "en"


def check_pair_differs(sample: PreferenceSample, normalizer: TextNormalizer, language: str | None) -> None:
    """A rejected transcript that reads as the chosen one (exactly, or after the evaluation normaliser) carries no
    preference: an error naming the line, never trained on silently."""
    chosen = normalizer(sample.chosen, language)
    for k, rejected in enumerate(sample.rejected):
        if normalizer(rejected, language) == chosen:
            name = f"rejected[{k}]" if len(sample.rejected) > 1 else "rejected"
            raise ManifestError(
                f"{sample.source}: field '{name}' reads the same as 'chosen' after Whisper's text normaliser "
                f"({chosen!r}): the pair carries no preference; give a rejected transcript that differs, or drop it"
            )


def transcripts_of(sample: PreferenceSample, timestamps: bool) -> list[tuple[str, str | list[Segment]]]:
    """(field name, transcript) for the chosen and each rejected transcript; segments with timestamps."""
    several = len(sample.rejected) > 1
    rejected_segments = sample.rejected_segments or [None] * len(sample.rejected)
    named = [("chosen", sample.chosen, sample.chosen_segments)] + [
        (f"rejected[{k}]" if several else "rejected", text, segs)
        for k, (text, segs) in enumerate(zip(sample.rejected, rejected_segments))
    ]
    if not timestamps:
        return [(name, text) for name, text, _ in named]
    for name, _, segs in named:
        if segs is None:
            raise ManifestError(
                f"{sample.source}: field '{name}' is plain text, but timestamps: true needs segments with "
                f"start and end times: give '{name.split('[')[0]}s' (or '{name.split('[')[0]}' itself) as "
                '[{"start": 0.0, "end": 1.4, "text": "..."}, ...]'
            )
    return [(name, segs) for name, _, segs in named]


def encode_sample(
    sample: PreferenceSample, tokens: WhisperTokens, default_language: str | None, normalizer: TextNormalizer
) -> EncodedSample:
    """A checked sample tokenised: its pairs must differ, and every transcript fit the decoder."""
    language = sample.language or (default_language if tokens.multilingual else None)
    check_pair_differs(sample, normalizer, language)
    segments = []
    for field_name, transcript in transcripts_of(sample, tokens.timestamps):
        try:
            ids, prefix_len = tokens.sequence(language, transcript)
        except ValueError as err:
            raise ManifestError(f"{sample.source}: {err}") from None
        if len(ids) - 1 > tokens.max_length:
            raise ManifestError(
                f"{sample.source}: field '{field_name}' is {len(ids) - 1} tokens long; "
                f"the model's decoder takes at most {tokens.max_length}"
            )
        segments.append((ids, prefix_len))
    return EncodedSample(sample, segments, language)
