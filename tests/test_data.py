"""Behaviour of orpo/data.py: manifests, audio loading, Whisper token sequences and the packing collator."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import write_clip, write_manifest

from orpo.data.audio import load_audio
from orpo.data.collate import IGNORE_INDEX, PreferenceCollator, pack_segments
from orpo.data.dataset import PreferenceDataset
from orpo.data.manifest import read_manifest
from orpo.data.tokens import WhisperTokens
from orpo.errors import ManifestError

# Ids of the multilingual (pre-v3) Whisper vocabulary, as pinned by tests/test_tokenizer_fixture.py.
EOT, SOT = 50257, 50258
EN, ZH, DE, FR = 50259, 50260, 50261, 50265
TRANSLATE, TRANSCRIBE, NO_TIMESTAMPS = 50358, 50359, 50363
TIMESTAMP_0 = 50364  # <|0.00|>; <|30.00|> is 51864
HELLO_WORLD = [2425, 1002]  # " Hello world", as tiktoken encodes it


def record(audio: str = "a.wav", **fields) -> dict:
    rec = {"audio": {"path": audio}, "chosen": "the cat sat", "rejected": "the cat sad", "language": "English"}
    rec.update(fields)
    return {k: v for k, v in rec.items() if v is not ...}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_tokens(processor, multilingual=True, task="transcribe", timestamps=False, max_length=448) -> WhisperTokens:
    return WhisperTokens(
        processor.tokenizer, multilingual=multilingual, task=task, timestamps=timestamps, max_length=max_length
    )


def make_dataset(processor, samples, default_language="English", min_len=0.0, max_len=30.0, **token_kwargs):
    return PreferenceDataset(
        samples,
        processor.feature_extractor,
        make_tokens(processor, **token_kwargs),
        default_language=default_language,
        min_len=min_len,
        max_len=max_len,
    )


# ---------------------------------------------------------------------------------------------------------
# Manifests


def test_json_lines_manifest(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "clips").mkdir()
    write_clip(folder / "clips" / "a.wav", 1.0, seed=0)
    write_clip(folder / "clips" / "b.wav", 2.0, seed=1)
    manifest = write_lines(
        folder / "train.jsonl",
        [
            json.dumps(record("clips/a.wav", chosen=" good one ", rejected="bad one", duration=1.0)),
            "",
            json.dumps(record("clips/b.wav", rejected=["bad two", "worse two"], language=...)),
        ],
    )
    monkeypatch.chdir(tmp_path)  # relative audio paths must resolve against the manifest's folder, not the cwd
    samples = read_manifest(manifest)
    assert len(samples) == 2
    assert [s.audio_path.resolve() for s in samples] == [folder / "clips" / "a.wav", folder / "clips" / "b.wav"]
    assert all(s.audio_path.is_file() for s in samples)
    assert [s.source for s in samples] == [f"{manifest}:1", f"{manifest}:3"]
    assert samples[0].chosen == "good one" and samples[0].rejected == ["bad one"]
    assert samples[1].rejected == ["bad two", "worse two"]
    assert samples[0].language == "English" and samples[1].language is None
    assert samples[0].duration == pytest.approx(1.0) and samples[1].duration == pytest.approx(2.0)


def test_relative_manifest_path_resolves_audio_against_its_folder(tmp_path, monkeypatch):
    write_manifest(tmp_path / "sub", count=2)
    monkeypatch.chdir(tmp_path)
    samples = read_manifest("sub/train.jsonl")
    assert [s.audio_path.resolve() for s in samples] == [
        tmp_path / "sub" / "audio" / f"train.jsonl-{i}.wav" for i in range(2)
    ]


def test_json_array_manifest_over_several_lines(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    write_clip(folder / "a.wav", 1.0, seed=0)
    write_clip(folder / "b.wav", 1.5, seed=1)
    text = (
        "[\n"  # 1
        "  {\n"  # 2
        '    "audio": {"path": "a.wav"},\n'  # 3
        '    "chosen": "first",\n'  # 4
        '    "rejected": "frist"\n'  # 5
        "  },\n"  # 6
        "\n"  # 7
        "  {\n"  # 8
        '    "audio": {"path": "b.wav"},\n'  # 9
        '    "chosen": "second",\n'  # 10
        '    "rejected": ["secnd", "sekond"],\n'  # 11
        '    "language": "zh"\n'  # 12
        "  }\n"  # 13
        "]\n"
    )
    manifest = folder / "train.json"
    manifest.write_text(text)
    monkeypatch.chdir(tmp_path)
    samples = read_manifest(manifest)
    assert [s.chosen for s in samples] == ["first", "second"]
    assert samples[1].rejected == ["secnd", "sekond"] and samples[1].language == "zh"
    assert [s.audio_path.resolve() for s in samples] == [folder / "a.wav", folder / "b.wav"]
    assert [s.source for s in samples] == [f"{manifest}:2", f"{manifest}:8"]

    # An error in the second record names the line where that record starts.
    manifest.write_text(text.replace('"chosen": "second",', '"chosen": "",'))
    with pytest.raises(ManifestError, match=rf"^{re.escape(str(manifest))}:8: field 'chosen'"):
        read_manifest(manifest)


def test_json_array_matches_json_lines(tmp_path):
    write_manifest(tmp_path, count=3)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.json").write_text(json.dumps([json.loads(line) for line in lines], indent=4))
    from_lines = read_manifest(tmp_path / "train.jsonl")
    from_array = read_manifest(tmp_path / "train.json")
    strip = lambda s: (s.audio_path, s.duration, s.chosen, s.rejected, s.language)  # noqa: E731
    assert [strip(s) for s in from_array] == [strip(s) for s in from_lines]


def test_json_array_on_one_line(tmp_path):
    write_clip(tmp_path / "a.wav", 1.0, seed=0)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([record(), record(chosen="again")]))
    assert [s.chosen for s in read_manifest(manifest)] == ["the cat sat", "again"]


def test_unclosed_json_array(tmp_path):
    write_clip(tmp_path / "a.wav", 1.0, seed=0)
    manifest = tmp_path / "m.json"
    manifest.write_text("[\n" + json.dumps(record()) + ",\n")
    with pytest.raises(ManifestError, match="not closed"):
        read_manifest(manifest)


def test_empty_manifest_and_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no records"):
        read_manifest(write_lines(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "missing.jsonl")


GOOD = record()


@pytest.mark.parametrize(
    "bad_line, field",
    [
        ('{"audio": {"path": "a.wav"}, "chosen": "x",', None),
        ("not json at all", None),
        (json.dumps(record(chosen=...)), "'chosen'"),
        (json.dumps(record(chosen="   ")), "'chosen'"),
        (json.dumps(record(chosen=3)), "'chosen'"),
        (json.dumps(record(rejected=...)), "'rejected'"),
        (json.dumps(record(rejected="")), "'rejected'"),
        (json.dumps(record(rejected=[])), "'rejected'"),
        (json.dumps(record(rejected=["fine", ""])), "'rejected[1]'"),
        (json.dumps(record(rejected=["fine", "  "])), "'rejected[1]'"),
        (json.dumps(record(rejected=["fine", None])), "'rejected[1]'"),
        (json.dumps(record(audio="missing.wav")), "'audio.path'"),
        (json.dumps(record(audio="x.wav")), "'audio.path'"),  # garbage bytes
        (json.dumps(record(audio="")), "'audio.path'"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "audio"}), "'audio.path'"),
        (json.dumps(record(language="Klingon")), "'language'"),
        (json.dumps(record(language=7)), "'language'"),
        ("[1, 2]", None),
    ],
)
def test_bad_manifest_line_names_file_line_and_field(tmp_path, bad_line, field):
    write_clip(tmp_path / "a.wav", 1.0, seed=0)
    (tmp_path / "x.wav").write_bytes(b"RIFF\x00\x01garbage, not audio at all" * 20)
    manifest = write_lines(tmp_path / "train.jsonl", [json.dumps(GOOD), "", bad_line, json.dumps(GOOD)])
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest)
    message = str(err.value)
    assert message.startswith(f"{manifest}:3:"), message
    if field is not None:
        assert field in message
    else:
        assert "JSON" in message


def test_bad_audio_messages_name_the_file(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"\x00\xff" * 500)
    manifest = write_lines(tmp_path / "m.jsonl", [json.dumps(record("x.wav"))])
    with pytest.raises(ManifestError, match="x.wav"):
        read_manifest(manifest)
    manifest = write_lines(tmp_path / "m.jsonl", [json.dumps(record("nope/missing.wav"))])
    with pytest.raises(ManifestError, match="missing.wav"):
        read_manifest(manifest)


def test_unknown_language_is_named(tmp_path):
    write_clip(tmp_path / "a.wav", 1.0, seed=0)
    manifest = write_lines(tmp_path / "m.jsonl", [json.dumps(record(language="Klingon"))])
    with pytest.raises(ManifestError, match="Klingon"):
        read_manifest(manifest)
    for name in ("Chinese", "chinese", "zh", "Mandarin", "German", "de"):
        manifest = write_lines(tmp_path / "m.jsonl", [json.dumps(record(language=name))])
        assert read_manifest(manifest)[0].language == name


def test_json_lines_with_unicode_line_separator_in_a_transcript(tmp_path):
    write_clip(tmp_path / "a.wav", 1.0, seed=0)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps(record(chosen="one\u2028two"), ensure_ascii=False)
        + "\n"
        + json.dumps(record(chosen="three"), ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    samples = read_manifest(manifest)
    assert [s.source for s in samples] == [f"{manifest}:1", f"{manifest}:2"]


# ---------------------------------------------------------------------------------------------------------
# Audio


def sine(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(audio: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[np.argmax(spectrum)])


def test_load_audio_16k_mono_passthrough(tmp_path):
    wave = sine(440, 16000)
    sf.write(str(tmp_path / "a.wav"), wave, 16000, subtype="FLOAT")
    audio = load_audio(tmp_path / "a.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1
    np.testing.assert_allclose(audio, wave, atol=1e-6)


def test_load_audio_mixes_stereo_to_mono(tmp_path):
    left, right = sine(440, 16000), sine(1000, 16000, amplitude=0.2)
    sf.write(str(tmp_path / "s.wav"), np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    audio = load_audio(tmp_path / "s.wav")
    assert audio.shape == (16000,) and audio.dtype == np.float32
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("rate, channels", [(44100, 1), (8000, 1), (44100, 2), (22050, 2)])
def test_load_audio_resamples_to_16k_and_keeps_pitch(tmp_path, rate, channels):
    wave = sine(440, rate)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    sf.write(str(tmp_path / "r.wav"), data, rate, subtype="FLOAT")
    audio = load_audio(tmp_path / "r.wav")
    assert audio.ndim == 1 and audio.dtype == np.float32
    assert abs(len(audio) - 16000) <= 1
    assert peak_hz(audio) == pytest.approx(440, abs=2)
    middle = audio[2000:-2000]  # away from filter edge effects
    assert np.max(np.abs(middle)) == pytest.approx(0.5, abs=0.02)


def test_load_audio_flac(tmp_path):
    sf.write(str(tmp_path / "a.flac"), sine(440, 44100), 44100)
    audio = load_audio(tmp_path / "a.flac")
    assert abs(len(audio) - 16000) <= 1 and peak_hz(audio) == pytest.approx(440, abs=2)


def test_load_audio_garbage_raises_manifest_error(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"garbage" * 100)
    with pytest.raises(ManifestError, match="x.wav"):
        load_audio(tmp_path / "x.wav")


# ---------------------------------------------------------------------------------------------------------
# Dataset: length filter and decoder length


def test_dataset_drops_clips_outside_length_range_and_logs_it(tmp_path, processor, caplog):
    lengths = [0.3, 0.5, 1.0, 2.9, 3.0, 3.2, 5.0]  # 0.5 and 3.0 sit on the (inclusive) bounds
    lines = []
    for i, seconds in enumerate(lengths):
        write_clip(tmp_path / f"c{i}.wav", seconds, seed=i)
        lines.append(json.dumps(record(f"c{i}.wav")))
    samples = read_manifest(write_lines(tmp_path / "m.jsonl", lines))
    caplog.set_level(logging.INFO, logger="orpo.data")
    ds = make_dataset(processor, samples, min_len=0.5, max_len=3.0)
    manifest = tmp_path / "m.jsonl"
    assert len(ds) == 4 and ds.dropped == [f"{manifest}:1", f"{manifest}:6", f"{manifest}:7"]
    assert [item.sample.audio_path.name for item in ds.items] == ["c1.wav", "c2.wav", "c3.wav", "c4.wav"]
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("orpo.data")]
    # issue 11, item 15: every dropped clip is named by file:line in the log, not only counted
    summary = [m for m in messages if "dropped 3 of 7" in m]
    assert summary and all(f"{manifest}:{line}" in summary[0] for line in (1, 6, 7)), messages
    assert f"{manifest}:2" not in summary[0]


def test_dataset_without_drops_logs_nothing(tmp_path, processor, caplog):
    samples = read_manifest(write_manifest(tmp_path, count=2))
    caplog.set_level(logging.INFO, logger="orpo.data")
    ds = make_dataset(processor, samples, min_len=0.5, max_len=30.0)
    assert len(ds) == 2 and ds.dropped == []
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]


def test_dataset_with_every_clip_dropped_raises(tmp_path, processor):
    samples = read_manifest(write_manifest(tmp_path, count=2, seconds=1.0))
    with pytest.raises(ManifestError, match="min_audio_len"):
        make_dataset(processor, samples, min_len=2.0, max_len=30.0)


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_transcript_longer_than_decoder_raises(tmp_path, processor, field):
    write_clip(tmp_path / "a.wav", 1.0, seed=0)
    long_text = " ".join(["word"] * 500)
    manifest = write_lines(tmp_path / "m.jsonl", [json.dumps(record()), json.dumps(record(**{field: long_text}))])
    samples = read_manifest(manifest)
    with pytest.raises(ManifestError) as err:
        make_dataset(processor, samples)
    message = str(err.value)
    assert message.startswith(f"{manifest}:2:")
    assert f"'{field}'" in message and "448" in message


def test_decoder_length_limit_is_exact(tmp_path, processor):
    """A transcript whose decoder input (all tokens but <|endoftext|>) fills max_length exactly is kept."""
    write_clip(tmp_path / "a.wav", 1.0, seed=0)
    samples = read_manifest(
        write_lines(tmp_path / "m.jsonl", [json.dumps(record(chosen="Hello world", rejected="Hello"))])
    )
    decoder_input = 4 + len(HELLO_WORLD)  # <|startoftranscript|><|en|><|transcribe|><|notimestamps|> Hello world
    assert len(make_dataset(processor, samples, max_length=decoder_input)) == 1
    with pytest.raises(ManifestError, match="'chosen'"):
        make_dataset(processor, samples, max_length=decoder_input - 1)


# ---------------------------------------------------------------------------------------------------------
# Whisper token sequences


def tokens_of(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("language", ["Chinese", "zh", "chinese", " ZH "])
def test_multilingual_prefix(processor, language):
    prefix = make_tokens(processor).prefix(language)
    assert tokens_of(processor, prefix) == ["<|startoftranscript|>", "<|zh|>", "<|transcribe|>", "<|notimestamps|>"]
    assert prefix == [SOT, ZH, TRANSCRIBE, NO_TIMESTAMPS]


def test_translate_prefix(processor):
    prefix = make_tokens(processor, task="translate").prefix("German")
    assert tokens_of(processor, prefix) == ["<|startoftranscript|>", "<|de|>", "<|translate|>", "<|notimestamps|>"]


def test_timestamps_drop_notimestamps(processor):
    assert make_tokens(processor, timestamps=True).prefix("en") == [SOT, EN, TRANSCRIBE]
    ids, prefix_len = make_tokens(processor, timestamps=True).sequence("en", "Hello world")
    assert ids == [SOT, EN, TRANSCRIBE, *HELLO_WORLD, EOT] and prefix_len == 3


def test_english_only_prefix(processor):
    tokens = make_tokens(processor, multilingual=False)
    assert tokens_of(processor, tokens.prefix(None)) == ["<|startoftranscript|>", "<|notimestamps|>"]
    assert tokens.prefix("French") == [SOT, NO_TIMESTAMPS]  # language and task are ignored
    assert make_tokens(processor, multilingual=False, timestamps=True).prefix(None) == [SOT]
    ids, prefix_len = tokens.sequence(None, "Hello world")
    assert ids == [SOT, NO_TIMESTAMPS, *HELLO_WORLD, EOT] and prefix_len == 2


def test_sequence_is_prefix_text_eot(processor):
    ids, prefix_len = make_tokens(processor).sequence("English", "  Hello world \n")
    assert ids == [SOT, EN, TRANSCRIBE, NO_TIMESTAMPS, *HELLO_WORLD, EOT]
    assert prefix_len == 4
    assert tokens_of(processor, ids[-1:]) == ["<|endoftext|>"]


def test_multilingual_without_language_is_an_error(processor, tmp_path):
    with pytest.raises(ValueError, match="language"):
        make_tokens(processor).prefix(None)
    write_clip(tmp_path / "a.wav", 1.0, seed=0)
    manifest = write_lines(tmp_path / "m.jsonl", [json.dumps(record(language=...))])
    with pytest.raises(ManifestError, match=rf"^{re.escape(str(manifest))}:1:.*language"):
        make_dataset(processor, read_manifest(manifest), default_language=None)


def test_sample_language_overrides_default(tmp_path, processor):
    write_clip(tmp_path / "a.wav", 1.0, seed=0)
    manifest = write_lines(
        tmp_path / "m.jsonl",
        [json.dumps(record(language="French", rejected=["x", "y"])), json.dumps(record(language=...))],
    )
    ds = make_dataset(processor, read_manifest(manifest), default_language="German")
    french, default = ds.items
    assert len(french.segments) == 3
    for ids, prefix_len in french.segments:
        assert ids[:prefix_len] == [SOT, FR, TRANSCRIBE, NO_TIMESTAMPS]
    for ids, prefix_len in default.segments:
        assert ids[:prefix_len] == [SOT, DE, TRANSCRIBE, NO_TIMESTAMPS]
    assert tokens_of(processor, [FR, DE]) == ["<|fr|>", "<|de|>"]


def test_dataset_item(tmp_path, processor):
    samples = read_manifest(write_manifest(tmp_path, count=2))
    ds = make_dataset(processor, samples)
    item = ds[1]
    assert item["index"] == 1
    assert item["input_features"].shape == (80, 3000)
    assert item["segments"][0][0] == make_tokens(processor).sequence("English", samples[1].chosen)[0]
    assert item["segments"][1][0] == make_tokens(processor).sequence("English", samples[1].rejected[0])[0]


# ---------------------------------------------------------------------------------------------------------
# Packing and collation


def test_pack_segments_literal():
    a, b, c = 11, 12, 13
    segments = [([SOT, EN, TRANSCRIBE, NO_TIMESTAMPS, a, b, EOT], 4), ([SOT, NO_TIMESTAMPS, c, EOT], 2)]
    row = pack_segments(segments)
    assert row["input_ids"] == [SOT, EN, TRANSCRIBE, NO_TIMESTAMPS, a, b, SOT, NO_TIMESTAMPS, c]
    assert row["labels"] == [EN, TRANSCRIBE, NO_TIMESTAMPS, a, b, EOT, NO_TIMESTAMPS, c, EOT]
    assert row["positions"] == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert row["segment_ids"] == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert row["transcript"] == [False, False, False, True, True, True, False, True, True]


def check_row(batch, row, expected_segments, pad_token_id):
    """Every segment of one collated row, against the token sequences it should hold."""
    inputs, labels = batch["decoder_input_ids"][row], batch["labels"][row]
    positions, segment_ids = batch["position_ids"][row], batch["segment_ids"][row]
    mask = batch["transcript_mask"][row]
    used = segment_ids >= 0
    n_used = int(used.sum())
    # Segments come first, padding after; segment ids run 0, 1, ..., K in order.
    assert used[:n_used].all() and not used[n_used:].any()
    assert torch.equal(torch.unique_consecutive(segment_ids[:n_used]), torch.arange(len(expected_segments)))
    assert n_used == sum(len(ids) - 1 for ids, _ in expected_segments)
    for s, (ids, prefix_len) in enumerate(expected_segments):
        idx = (segment_ids == s).nonzero().flatten()
        assert torch.equal(idx, torch.arange(idx[0], idx[0] + len(idx)))  # contiguous
        seg_in, seg_lab, seg_pos, seg_mask = inputs[idx], labels[idx], positions[idx], mask[idx]
        assert seg_in[0] == SOT
        assert torch.equal(seg_lab[:-1], seg_in[1:])  # label k is decoder input k+1
        assert seg_lab[-1] == EOT
        assert [SOT] + seg_lab.tolist() == ids and seg_in.tolist() == ids[:-1]
        assert seg_pos.tolist() == list(range(len(idx)))
        # transcript_mask: the text tokens and <|endoftext|>, never <|lang|>, <|task|>, <|notimestamps|>
        # (timestamp tokens, <|0.00|> and up, are transcript tokens too)
        text_or_eot = (seg_lab < EOT) | (seg_lab == EOT) | (seg_lab >= TIMESTAMP_0)
        assert torch.equal(seg_mask, text_or_eot)
        assert int((~seg_mask).sum()) == prefix_len - 1
    pad = ~used
    assert (labels[pad] == IGNORE_INDEX).all() and not (labels[used] == IGNORE_INDEX).any()
    assert (inputs[pad] == pad_token_id).all()
    assert not mask[pad].any()
    assert (segment_ids[pad] == -1).all()


COLLATE_CLIPS = [  # (audio, chosen, rejected, language)
    ("a.wav", "Hello world", ["Hello word"], "English"),
    (
        "b.wav",
        "we meet at two o'clock in the afternoon",
        ["we meet at to o'clock", "we met at two", "wee meat at two o'clock"],
        "German",
    ),
    ("a.wav", "short", ["shirt"], "English"),
]


def test_collator_packs_clips_with_different_numbers_of_rejected(tmp_path, processor):
    write_clip(tmp_path / "a.wav", 1.0, seed=0)
    write_clip(tmp_path / "b.wav", 1.5, seed=1)
    manifest = write_lines(
        tmp_path / "m.jsonl",
        [
            json.dumps(record(audio, chosen=chosen, rejected=rejected, language=language))
            for audio, chosen, rejected, language in COLLATE_CLIPS
        ],
    )
    ds = make_dataset(processor, read_manifest(manifest))
    collate = PreferenceCollator(pad_token_id=EOT)
    batch = collate([ds[0], ds[1], ds[2]])

    assert batch["num_segments"].tolist() == [2, 4, 2]
    assert batch["sample_index"].tolist() == [0, 1, 2]
    assert batch["input_features"].shape == (3, 80, 3000) and batch["input_features"].dtype == torch.float32
    width = batch["decoder_input_ids"].shape[1]
    for key in ("labels", "position_ids", "segment_ids", "transcript_mask"):
        assert batch[key].shape == (3, width), key
    assert batch["transcript_mask"].dtype == torch.bool
    assert batch["decoder_input_ids"].dtype == batch["labels"].dtype == torch.long
    # The second clip is the longest row: no padding there, padding in the others.
    assert (batch["segment_ids"][1] >= 0).all()
    assert (batch["segment_ids"][0] == -1).any() and (batch["segment_ids"][2] == -1).any()

    tokens = make_tokens(processor)
    for row, (_, chosen, rejected, language) in enumerate(COLLATE_CLIPS):
        # chosen is segment 0, the rejected ones follow in manifest order
        expected = [tokens.sequence(language, text) for text in [chosen] + rejected]
        check_row(batch, row, expected, EOT)
    first = batch["labels"][0][batch["segment_ids"][0] == 0].tolist()
    assert first == [EN, TRANSCRIBE, NO_TIMESTAMPS, *HELLO_WORLD, EOT]


def test_collator_english_only_and_timestamps(tmp_path, processor):
    write_clip(tmp_path / "a.wav", 1.0, seed=0)

    def timed(text):
        return [{"start": 0.0, "end": 0.5, "text": text}, {"start": 0.5, "end": 0.98, "text": "again"}]

    manifest = write_lines(
        tmp_path / "m.jsonl",
        [
            json.dumps(
                record(
                    chosen="Hello world",
                    rejected=["a", "b c"],
                    chosens=timed("Hello world"),
                    rejecteds=[timed("a"), timed("b c")],
                )
            )
        ],
    )
    samples = read_manifest(manifest)
    for kwargs, prefix in [
        (dict(multilingual=False), [SOT, NO_TIMESTAMPS]),
        (dict(timestamps=True), [SOT, EN, TRANSCRIBE]),
    ]:
        ds = make_dataset(processor, samples, **kwargs)
        batch = PreferenceCollator(pad_token_id=EOT)([ds[0]])
        assert batch["num_segments"].tolist() == [3]
        expected = [ds.items[0].segments[k] for k in range(3)]
        assert all(ids[: len(prefix)] == prefix and n == len(prefix) for ids, n in expected)
        assert any(t >= TIMESTAMP_0 for ids, _ in expected for t in ids) == kwargs.get("timestamps", False)
        check_row(batch, 0, expected, EOT)


def test_collator_pad_token_id_is_used(tmp_path, processor):
    samples = read_manifest(write_manifest(tmp_path, count=2))
    ds = make_dataset(processor, samples)
    batch = PreferenceCollator(pad_token_id=12345)([ds[0], ds[1]])
    lengths = (batch["segment_ids"] >= 0).sum(dim=1)
    short = int(torch.argmin(lengths))
    assert lengths[0] != lengths[1]
    assert (batch["decoder_input_ids"][short][lengths[short] :] == 12345).all()
    assert (batch["position_ids"][short][lengths[short] :] == 0).all()


def test_manifest_with_byte_order_mark_reads(tmp_path):
    write_clip(tmp_path / "a.wav", 1.0, seed=0)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(record()) + "\n", encoding="utf-8-sig")
    assert len(read_manifest(manifest)) == 1
