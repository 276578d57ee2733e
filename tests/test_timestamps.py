"""Timestamped transcripts: segment lists in manifests, Whisper's timestamp tokens, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import write_clip

from orpo.data.collate import PreferenceCollator, pack_segments
from orpo.data.dataset import PreferenceDataset
from orpo.data.manifest import read_manifest
from orpo.data.schema import Segment
from orpo.data.tokens import WhisperTokens
from orpo.errors import ManifestError

# Multilingual (pre-v3) Whisper ids, as pinned by tests/test_tokenizer_fixture.py.
EOT, SOT, EN, TRANSCRIBE, NO_TIMESTAMPS = 50257, 50258, 50259, 50359, 50363
T0 = 50364  # <|0.00|>; <|t|> is T0 + t / 0.02, up to <|30.00|> = 51864
HELLO_WORLD = [2425, 1002]  # " Hello world"
HELLO = [2425]  # " Hello"


def ts(seconds: float) -> int:
    """Timestamp token id, by hand: 0.02 s per token from <|0.00|>."""
    return T0 + round(seconds / 0.02)


def tokens_for(processor, timestamps=True, multilingual=True) -> WhisperTokens:
    return WhisperTokens(
        processor.tokenizer, multilingual=multilingual, task="transcribe", timestamps=timestamps, max_length=448
    )


def write_lines(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def seg(start, end, text):
    return {"start": start, "end": end, "text": text}


def base_record(**fields) -> dict:
    rec = {"audio": {"path": "a.wav"}, "language": "English"}
    rec.update(fields)
    return rec


@pytest.fixture
def clip(tmp_path):
    write_clip(tmp_path / "a.wav", 3.0, seed=0)
    return tmp_path


def test_timestamp_token_ids(processor):
    tokens = tokens_for(processor)
    assert tokens.timestamp(0.0) == 50364 and tokens.timestamp(30.0) == 51864
    assert processor.tokenizer.convert_ids_to_tokens([50364, 50365, 51864]) == ["<|0.00|>", "<|0.02|>", "<|30.00|>"]
    assert tokens.timestamp(1.4) == ts(1.4) == 50364 + 70
    assert tokens.timestamp(1.409) == ts(1.40) and tokens.timestamp(1.411) == ts(1.42)  # nearest 0.02 s
    assert processor.tokenizer.convert_ids_to_tokens(tokens.timestamp(2.35)) in ("<|2.34|>", "<|2.36|>")
    with pytest.raises(ValueError, match="30"):
        tokens.timestamp(30.2)


def test_segments_tokenise_like_whisper_by_hand(processor):
    segments = [Segment(0.0, 1.4, "Hello world"), Segment(1.5, 2.0, "Hello")]
    ids, prefix_len = tokens_for(processor).sequence("English", segments)
    # <|sot|><|en|><|transcribe|> <|0.00|> Hello world <|1.40|><|1.50|> Hello <|2.00|> <|endoftext|>
    assert ids == [SOT, EN, TRANSCRIBE, ts(0.0), *HELLO_WORLD, ts(1.4), ts(1.5), *HELLO, ts(2.0), EOT]
    assert prefix_len == 3 and NO_TIMESTAMPS not in ids
    names = processor.tokenizer.convert_ids_to_tokens(ids)
    assert names[:4] == ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|0.00|>"]
    assert names[6:8] == ["<|1.40|>", "<|1.50|>"] and names[-2:] == ["<|2.00|>", "<|endoftext|>"]
    # English-only models: no language or task token, the same timestamp tokens
    ids_en, n = tokens_for(processor, multilingual=False).sequence(None, segments)
    assert ids_en == [SOT] + ids[3:] and n == 1


def test_transcript_mask_counts_timestamp_tokens(processor):
    segments = [Segment(0.0, 1.4, "Hello world"), Segment(1.5, 2.0, "Hello")]
    tokens = tokens_for(processor)
    chosen = tokens.sequence("English", segments)
    rejected = tokens.sequence("English", [Segment(0.0, 2.0, "Hello")])
    row = pack_segments([chosen, rejected])
    for (ids, prefix_len), start in ((chosen, 0), (rejected, len(chosen[0]) - 1)):
        labels = row["labels"][start : start + len(ids) - 1]
        mask = row["transcript"][start : start + len(ids) - 1]
        assert labels == ids[1:]
        # every label from the first timestamp token to <|endoftext|> counts; <|en|><|transcribe|> do not
        assert mask == [label not in (EN, TRANSCRIBE) for label in labels]
        assert labels[prefix_len - 1] == ts(0.0) and mask[prefix_len - 1]
        assert sum(mask) == len(ids) - prefix_len


def test_manifest_segment_forms(clip, processor):
    chosen = [seg(0.0, 1.4, "Hello world"), seg(1.5, 2.0, "Hello")]
    manifest = write_lines(
        clip / "m.jsonl",
        [
            base_record(chosens=chosen, rejecteds=[seg(0.0, 2.0, "Hello")]),  # the keys
            base_record(chosen=chosen, rejected=[[seg(0.0, 2.0, "Hello")], [seg(0.1, 1.0, "world")]]),  # lists in place
            base_record(
                chosen="Hello world. Hello!", chosens=chosen, rejected="Hello", rejecteds=[seg(0.0, 2.0, "Hello")]
            ),  # text and segments
            base_record(chosen="plain", rejected="plainer"),
        ],
    )
    samples = read_manifest(manifest)
    first, second, third, plain = samples
    assert first.chosen == "Hello world Hello" and first.rejected == ["Hello"]
    assert first.chosen_segments == [Segment(0.0, 1.4, "Hello world"), Segment(1.5, 2.0, "Hello")]
    assert first.rejected_segments == [[Segment(0.0, 2.0, "Hello")]]
    assert second.rejected == ["Hello", "world"] and len(second.rejected_segments) == 2
    assert third.chosen == "Hello world. Hello!" and third.chosen_segments == first.chosen_segments
    assert plain.chosen_segments is None and plain.rejected_segments is None

    ds = PreferenceDataset(samples[:3], processor.feature_extractor, tokens_for(processor), None, 0.0, 30.0)
    ids, _ = ds.items[0].segments[0]
    assert ids == [SOT, EN, TRANSCRIBE, ts(0.0), *HELLO_WORLD, ts(1.4), ts(1.5), *HELLO, ts(2.0), EOT]
    assert ds.items[1].segments[2][0] == [SOT, EN, TRANSCRIBE, ts(0.1), 1002, ts(1.0), EOT]  # " world"
    assert ds.items[2].segments[0][0] == ids  # segments win over the text when timestamps are on
    batch = PreferenceCollator(EOT)([ds[0], ds[1]])
    assert batch["num_segments"].tolist() == [2, 3]

    # Without timestamps the same manifest trains on the text (segment texts joined)
    plain_ds = PreferenceDataset(
        samples, processor.feature_extractor, tokens_for(processor, timestamps=False), None, 0.0, 30.0
    )
    text_tokens = tokens_for(processor, timestamps=False)
    assert plain_ds.items[0].segments[0][0] == text_tokens.sequence("English", "Hello world Hello")[0]
    assert plain_ds.items[2].segments[0][0] == text_tokens.sequence("English", "Hello world. Hello!")[0]


def test_plain_text_with_timestamps_is_an_error(clip, processor):
    manifest = write_lines(
        clip / "m.jsonl",
        [
            base_record(chosens=[seg(0.0, 1.0, "Hello")], rejecteds=[seg(0.0, 1.0, "Hi")]),
            base_record(chosens=[seg(0.0, 1.0, "Hello")], rejected=["Hi", "Ho"]),
        ],
    )
    samples = read_manifest(manifest)
    with pytest.raises(ManifestError, match=rf"^{re.escape(str(manifest))}:2: field 'rejected\[0\]' is plain text"):
        PreferenceDataset(samples, processor.feature_extractor, tokens_for(processor), None, 0.0, 30.0)


GOOD = [seg(0.0, 1.0, "one"), seg(1.2, 2.0, "two")]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(chosens=[seg(0.0, 1.0, "one"), seg(1.5, 1.2, "two")]), "'chosens[1].end' (1.2 s) is before its start"),
        (
            dict(chosens=[seg(0.0, 1.0, "one"), seg(1.2, 3.5, "two")]),
            "'chosens[1].end' (3.5 s) is beyond the clip's duration (3.00 s)",
        ),
        (
            dict(chosens=[seg(0.0, 1.0, "one"), seg(0.8, 2.0, "two")]),
            "'chosens[1].start' (0.8 s) is before the end of the previous segment",
        ),
        (dict(chosens=[seg(1.2, 2.0, "two"), seg(0.0, 1.0, "one")]), "'chosens[1].start' (0.0 s) is before the end"),
        (dict(chosens=[seg(-0.1, 1.0, "one")]), "'chosens[0].start' is negative"),
        (dict(chosens=[{"start": 0.0, "text": "one"}]), "'chosens[0].end' is missing"),
        (dict(chosens=[{"start": "0", "end": 1.0, "text": "one"}]), "'chosens[0].start' must be a number"),
        (dict(chosens=[seg(0.0, 1.0, "  ")]), "'chosens[0].text' must be a non-empty string"),
        (dict(chosens=[]), "'chosens' must be a non-empty list of segments"),
        (dict(chosens="text"), "'chosens' must be a non-empty list of segments"),
        (
            dict(rejecteds=[[seg(0.0, 1.0, "a")], [seg(0.5, 0.2, "b")]]),
            "'rejecteds[1][0].end' (0.2 s) is before its start",
        ),
        (
            dict(rejected=["a", "b"], rejecteds=[seg(0.0, 1.0, "a")]),
            "'rejected' holds 2 transcripts but 'rejecteds' holds 1",
        ),
        (dict(chosen=[seg(0.0, 1.0, "one"), "two"]), "'chosen' must be a non-empty string or a list of segments"),
    ],
)
def test_bad_segments_name_file_line_and_field(clip, fields, message):
    rec = base_record(chosens=GOOD, rejecteds=GOOD)
    rec.update(fields)
    manifest = write_lines(clip / "m.jsonl", [base_record(chosens=GOOD, rejecteds=GOOD), rec])
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest)
    assert str(err.value).startswith(f"{manifest}:2: field "), str(err.value)
    assert message in str(err.value)


def test_segment_end_tolerance_is_one_timestamp_step(clip):
    ok = write_lines(clip / "ok.jsonl", [base_record(chosens=[seg(0.0, 3.02, "a")], rejecteds=[seg(0.0, 3.0, "b")])])
    assert read_manifest(ok)[0].chosen_segments[0].end == 3.02
    bad = write_lines(clip / "bad.jsonl", [base_record(chosens=[seg(0.0, 3.03, "a")], rejecteds=[seg(0.0, 3.0, "b")])])
    with pytest.raises(ManifestError, match="beyond the clip's duration"):
        read_manifest(bad)
