"""Hugging Face datasets as input: save_to_disk directories and load_dataset folders, mapped columns,
audio decoded with soundfile from the stored bytes or path, errors that name the row and column."""

from __future__ import annotations

import io
import json
import pickle
import re

import numpy as np
import pytest
import soundfile as sf
from conftest import SENTENCES, write_clip, write_manifest
from datasets import Audio, Dataset, DatasetDict

from orpo.config import TrainConfig
from orpo.data.collate import PreferenceCollator
from orpo.data.dataset import DATASET_KEYS, build_dataset, load_samples
from orpo.data.hf import read_hf_dataset
from orpo.data.manifest import read_manifest
from orpo.data.tokens import WhisperTokens
from orpo.errors import ManifestError


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def tokens_for(processor, timestamps=False) -> WhisperTokens:
    return WhisperTokens(processor.tokenizer, True, "transcribe", timestamps, 448)


@pytest.fixture
def manifest(tmp_path):
    return write_manifest(tmp_path / "data", count=4)


def dataset_from_manifest(manifest_path, embed: bool) -> Dataset:
    """The manifest's clips as a dataset with an Audio column: bytes embedded, or paths only."""
    records = [json.loads(line) for line in manifest_path.read_text().splitlines()]
    audio = []
    for r in records:
        path = str(manifest_path.parent / r["audio"]["path"])
        audio.append({"bytes": open(path, "rb").read(), "path": None} if embed else {"bytes": None, "path": path})
    ds = Dataset.from_dict(
        {
            "audio": audio,
            "chosen": [r["chosen"] for r in records],
            "rejected": [r["rejected"] for r in records],
            "language": [r["language"] for r in records],
        }
    )
    return ds.cast_column("audio", Audio())  # the usual decoded-audio feature: we read it without decoding


@pytest.mark.parametrize("embed", [True, False])
def test_saved_dataset_dict_matches_the_manifest(tmp_path, processor, manifest, embed):
    ds = dataset_from_manifest(manifest, embed)
    folder = tmp_path / "prefs"
    DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(folder))
    cfg = TrainConfig(train_data=str(folder), test_data=str(folder), language="English")
    tokens = tokens_for(processor)
    train = build_dataset(cfg, "train", processor.feature_extractor, tokens)
    test = build_dataset(cfg, "test", processor.feature_extractor, tokens)
    assert len(train) == 4 and len(test) == 2
    assert [item.sample.source for item in test.items] == [f"dataset {folder} (split test), row {i}" for i in range(2)]

    from_manifest = build_dataset(
        TrainConfig(train_data=str(manifest), language="English"), "train", processor.feature_extractor, tokens
    )
    for i in range(4):
        ours, want = train.items[i].sample, from_manifest.items[i].sample
        assert (ours.chosen, ours.rejected, ours.language) == (want.chosen, want.rejected, want.language)
        assert ours.duration == pytest.approx(want.duration)
        assert train.items[i].segments == from_manifest.items[i].segments
        np.testing.assert_array_equal(train[i]["input_features"], from_manifest[i]["input_features"])
    batch = PreferenceCollator(tokens.eot)([train[0], train[1]])
    assert batch["input_features"].shape == (2, 80, 3000)


def test_column_mapping_several_rejected_and_audio_conversion(tmp_path, processor):
    rng = np.random.default_rng(0)
    stereo_44k = (0.1 * rng.standard_normal((44100, 2))).astype(np.float32)
    mono_16k = (0.1 * rng.standard_normal(24000)).astype(np.float32)
    ds = Dataset.from_dict(
        {
            "speech": [
                {"bytes": wav_bytes(stereo_44k, 44100), "path": "clip0.wav"},
                {"bytes": wav_bytes(mono_16k, 16000), "path": None},
            ],
            "good": ["hello there", "good morning"],
            "bad": [["hello their", "yellow there"], ["good mourning"]],
            "lang": ["en", "German"],
        }
    ).cast_column("speech", Audio(sampling_rate=16000))
    folder = tmp_path / "single"
    ds.save_to_disk(str(folder))  # a single Dataset: any split name reads it
    samples = read_hf_dataset(
        str(folder),
        split="whatever",
        audio_column="speech",
        chosen_column="good",
        rejected_column="bad",
        language_column="lang",
    )
    assert [s.rejected for s in samples] == [["hello their", "yellow there"], ["good mourning"]]
    assert [s.language for s in samples] == ["en", "German"]
    assert samples[0].duration == pytest.approx(1.0) and samples[1].duration == pytest.approx(1.5)
    assert samples[0].source == f"dataset {folder}, row 0"
    audio0 = samples[0].audio_loader()
    assert audio0.dtype == np.float32 and audio0.ndim == 1 and len(audio0) == 16000  # mono, 16 kHz
    np.testing.assert_allclose(samples[1].audio_loader(), mono_16k, atol=1e-7)
    # the loader pickles small (DataLoader workers): the dataset travels by reference to its files
    blob = pickle.dumps(samples[1].audio_loader)
    assert len(blob) < 20_000
    np.testing.assert_array_equal(pickle.loads(blob)(), samples[1].audio_loader())


def test_load_dataset_on_a_parquet_folder_with_splits(tmp_path, processor, manifest):
    ds = dataset_from_manifest(manifest, embed=True)
    data = tmp_path / "hubish" / "data"
    data.mkdir(parents=True)
    ds.to_parquet(str(data / "train-00000-of-00001.parquet"))
    ds.select([2, 3]).to_parquet(str(data / "validation-00000-of-00001.parquet"))
    cfg = TrainConfig(train_data=str(tmp_path / "hubish"), test_data=str(tmp_path / "hubish"), test_split="validation")
    assert len(load_samples(cfg.train_data, cfg.train_split, **{key: getattr(cfg, key) for key in DATASET_KEYS})) == 4
    test = load_samples(cfg.test_data, cfg.test_split, **{key: getattr(cfg, key) for key in DATASET_KEYS})
    assert [s.chosen for s in test] == [SENTENCES[2][0], SENTENCES[3][0]]
    assert test[0].source.startswith(f"dataset {tmp_path / 'hubish'}, split validation, row 0")
    with pytest.raises(ManifestError, match="cannot load it"):
        load_samples(cfg.test_data, "nosuchsplit", **{key: getattr(cfg, key) for key in DATASET_KEYS})


def test_timestamped_segments_in_dataset_columns(tmp_path, processor):
    write_clip(tmp_path / "a.wav", 2.0, seed=0)
    ds = Dataset.from_dict(
        {
            "audio": [str(tmp_path / "a.wav")],  # a plain path column
            "chosen": [[{"start": 0.0, "end": 1.0, "text": "Hello"}, {"start": 1.0, "end": 1.9, "text": "world"}]],
            "rejected": [[{"start": 0.0, "end": 1.9, "text": "Hello word"}]],
        }
    )
    ds.save_to_disk(str(tmp_path / "ts"))
    cfg = TrainConfig(train_data=str(tmp_path / "ts"), timestamps=True, language="en")
    train = build_dataset(cfg, "train", processor.feature_extractor, tokens_for(processor, timestamps=True))
    sample = train.items[0].sample
    assert sample.chosen == "Hello world" and sample.rejected == ["Hello word"]
    ids, prefix_len = train.items[0].segments[0]
    assert prefix_len == 3 and ids[3] == 50364 and ids[-2] == 50364 + 95  # <|0.00|> ... <|1.90|>


def write_rows(tmp_path, **columns):
    n = len(next(iter(columns.values())))
    columns.setdefault("audio", [str(write_clip(tmp_path / f"r{i}.wav", 1.0, seed=i)) for i in range(n)])
    folder = tmp_path / "bad"
    Dataset.from_dict(columns).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize(
    "columns, config, message",
    [
        (dict(chosen=["a", " "], rejected=["b", "c"]), {}, "row 1: column 'chosen' must be a non-empty string"),
        (dict(chosen=["a", None], rejected=["b", "c"]), {}, "row 1: column 'chosen' is missing"),
        (dict(chosen=["a", "b"], rejected=[["x"], []]), {}, "row 1: column 'rejected' is an empty list"),
        (dict(chosen=["a", "b"], rejected=["x", "y"], language=["en", "Klingon"]), {}, "row 1: column 'language'"),
        (
            dict(chosen=["a", "b"], rejected=["x", "y"], audio=[{"bytes": b"RIFFnot audio" * 9, "path": None}] * 2),
            {},
            "row 0: column 'audio': cannot decode the audio",
        ),
        (
            dict(chosen=["a", "b"], rejected=["x", "y"], audio=["/nowhere/a.wav"] * 2),
            {},
            "row 0: column 'audio': file /nowhere/a.wav does not exist",
        ),
        (
            dict(text=["a", "b"], rejected=["x", "y"]),
            {},
            "no column 'chosen' (columns: text, rejected, audio); set chosen_column",
        ),
        (dict(chosen=["a", "b"], rejected=["x", "y"]), dict(language_column="lang"), "no column 'lang'"),
    ],
)
def test_bad_rows_name_the_row_and_column(tmp_path, columns, config, message):
    folder = write_rows(tmp_path, **columns)
    with pytest.raises(ManifestError) as err:
        read_hf_dataset(str(folder), **config)
    assert str(err.value).startswith(f"dataset {folder}"), str(err.value)
    assert message in str(err.value), str(err.value)


def test_missing_split_lists_the_splits(tmp_path, manifest):
    ds = dataset_from_manifest(manifest, embed=True)
    DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ManifestError, match=re.escape("no split 'test' (splits: train); set train_split/test_split")):
        read_hf_dataset(str(tmp_path / "dd"), split="test")


def test_manifest_paths_still_read_as_manifests(tmp_path, manifest):
    cfg = TrainConfig(train_data=str(manifest))
    assert [
        s.source for s in load_samples(str(manifest), "train", **{key: getattr(cfg, key) for key in DATASET_KEYS})
    ] == [s.source for s in read_manifest(manifest)]
    with pytest.raises(ManifestError, match="manifest .*missing.jsonl does not exist"):
        load_samples(str(tmp_path / "missing.jsonl"), "train", **{key: getattr(cfg, key) for key in DATASET_KEYS})
