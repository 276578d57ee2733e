"""The manifest index: a manifest checked once (in parallel for large ones) and cached as arrays holds exactly what
the per-sample path makes; the cache is reused while the manifest, its audio and the settings are the same, and
rebuilt when any changes; shards; the first bad line in file order is still the error; and in a two-process run
only the main process checks."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, write_clip
from transformers import WhisperConfig, WhisperProcessor

import orpo.data.index as index_module
from orpo.data.dataset import PreferenceDataset
from orpo.data.index import ClipIndex, load_index, manifest_files
from orpo.data.manifest import read_manifest
from orpo.data.tokens import WhisperTokens
from orpo.errors import ManifestError

RECORDS = [
    {"chosen": "the cat sat on the mat", "rejected": "the cat sat on the map", "language": "en"},
    {"chosen": "we meet at two", "rejected": ["we met at two", "we meet at too", "wee meet at two"]},
    {"chosen": "guten morgen", "rejected": "guten abend", "language": "German"},
    {"chosen": "please write it down", "rejected": ["please right it down"], "duration": 1.5},
    {"chosen": "a quick brown fox", "rejected": "a quick brown box", "language": "fr"},
]


def write_records(folder: Path, records: list[dict], name: str = "train.jsonl", repeat: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, record in enumerate(records * repeat):
        clip = i % len(records)
        seconds = record.get("duration", 1.0 + 0.25 * clip)
        audio = f"{Path(name).stem}-{clip}.wav"
        if not (folder / audio).exists():
            write_clip(folder / audio, seconds, seed=clip)
        lines.append(json.dumps({"audio": audio, **record}))
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


@pytest.fixture(scope="module")
def tokens(tiny_model_dir):
    processor = WhisperProcessor.from_pretrained(tiny_model_dir)
    return WhisperTokens.for_model(processor.tokenizer, WhisperConfig.from_pretrained(tiny_model_dir))


def count_builds(monkeypatch) -> list[int]:
    builds = []
    real = index_module.build_index

    def counting(files, *args, **kwargs):
        builds.append(len(files))
        return real(files, *args, **kwargs)

    monkeypatch.setattr(index_module, "build_index", counting)
    return builds


def test_the_index_holds_what_the_per_sample_path_makes(tmp_path, tokens):
    manifest = write_records(tmp_path, RECORDS)
    index = load_index(str(manifest), tokens, "English", 0.1)
    from_index = PreferenceDataset(index, None, tokens, "English", 0.0, 30.0)
    from_samples = PreferenceDataset(read_manifest(manifest), None, tokens, "English", 0.0, 30.0)
    assert len(from_index) == len(from_samples) == 5
    for a, b in zip(from_index.items, from_samples.items):
        assert a.segments == b.segments and a.language == b.language
        assert (a.sample.audio_path, a.sample.chosen, a.sample.rejected) == (
            b.sample.audio_path,
            b.sample.chosen,
            b.sample.rejected,
        )
        assert a.sample.duration == pytest.approx(b.sample.duration) and a.sample.source == b.sample.source
    assert from_index.packed_lengths() == from_samples.packed_lengths()
    assert from_index.chosen_texts() == [r["chosen"] for r in RECORDS]
    # a changed clip (a refresh) is kept as an object; the others still come from the arrays
    from_index.replace_rejected(1, ["we meat at two"])
    assert from_index.items[1].sample.rejected == ["we meat at two"] and from_index.original_rejected(1)[0] == (
        "we met at two"
    )
    assert from_index.packed_lengths()[1] == sum(len(ids) - 1 for ids, _ in from_index.items[1].segments)
    # clips outside [min, max] seconds are dropped and named
    short = PreferenceDataset(index, None, tokens, "English", 0.0, 1.3)
    assert len(short) == 2 and short.dropped == [f"{manifest}:{line}" for line in (3, 4, 5)]


def test_a_second_load_reads_the_cache_and_a_change_checks_again(tmp_path, tokens, monkeypatch):
    builds = count_builds(monkeypatch)
    manifest = write_records(tmp_path / "data", RECORDS)
    first = load_index(str(manifest), tokens, "English", 0.1)
    second = load_index(str(manifest), tokens, "English", 0.1)
    assert builds == [1], "the second load checked the manifest again"
    assert all(np.array_equal(first.arrays[k], second.arrays[k]) for k in first.arrays)
    assert isinstance(second.arrays["tokens"], np.memmap), "the cached arrays are memory-mapped"
    assert (tmp_path / "data" / ".whisper-orpo-index").is_dir()
    load_index(str(manifest), tokens, "German", 0.1)  # another default language: other prefixes
    assert builds == [1, 1]
    os.utime(tmp_path / "data" / "train-0.wav", ns=(1, 1))  # an audio file changed
    load_index(str(manifest), tokens, "English", 0.1)
    assert builds == [1, 1, 1]
    manifest.write_text(manifest.read_text().replace("the cat sat", "the dog sat"))
    changed = load_index(str(manifest), tokens, "English", 0.1)
    assert builds == [1, 1, 1, 1] and changed.sample(0).chosen == "the dog sat on the mat"
    own = tmp_path / "cache"
    load_index(str(manifest), tokens, "English", 0.1, index_cache_dir=str(own))
    assert len(list(own.iterdir())) == 1


def test_shards_by_glob_or_list_are_one_index_in_order(tmp_path, tokens):
    first = write_records(tmp_path, RECORDS[:2], name="part-00.jsonl")
    second = write_records(tmp_path, RECORDS[2:], name="part-01.jsonl")
    assert manifest_files(str(tmp_path / "part-*.jsonl")) == [first, second]
    by_glob = load_index(str(tmp_path / "part-*.jsonl"), tokens, "English", 0.1)
    by_list = load_index(f"{first},{second}", tokens, "English", 0.1)
    assert len(by_glob) == len(by_list) == 5
    assert [by_glob.source(i) for i in range(5)] == [f"{first}:1", f"{first}:2"] + [f"{second}:{n}" for n in (1, 2, 3)]
    assert [by_list.sample(i).chosen for i in range(5)] == [r["chosen"] for r in RECORDS]
    with pytest.raises(ManifestError, match="no manifest matches"):
        manifest_files(str(tmp_path / "nothing-*.jsonl"))


def test_checking_in_parallel_gives_the_same_index_and_the_first_bad_line(tmp_path, tokens, monkeypatch):
    monkeypatch.setattr(index_module, "PARALLEL_LINES", 0)  # worker processes even for a small manifest
    manifest = write_records(tmp_path, RECORDS, repeat=40)  # 200 lines, 8 parts
    sequential = index_module.build_index([manifest], tokens, "English", 0.1, num_proc=1)
    parallel = index_module.build_index([manifest], tokens, "English", 0.1, num_proc=2)
    assert len(parallel) == 200
    assert all(np.array_equal(sequential.arrays[k], parallel.arrays[k]) for k in sequential.arrays)
    assert sequential.languages == parallel.languages == ["German", "en", "fr"]
    lines = manifest.read_text().splitlines()
    lines[150] = lines[150].replace('"chosen"', '"chosen_text"')  # line 151: in a later part
    lines[120] = lines[120].replace("train-0.wav", "missing.wav")  # line 121
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=rf"{manifest}:121: field 'audio.path'"):
        index_module.build_index([manifest], tokens, "English", 0.1, num_proc=2)


def test_a_clip_index_survives_its_save_and_load(tmp_path, tokens):
    index = index_module.build_index([write_records(tmp_path, RECORDS)], tokens, "English", 0.1, num_proc=1)
    index.save(tmp_path / "saved", key="k")
    loaded = ClipIndex.load(tmp_path / "saved")
    assert [loaded.sample(i) for i in range(5)] == [index.sample(i) for i in range(5)]
    assert not list(tmp_path.glob(".tmp-*")), "the staging folder is renamed into place"
    travelled = pickle.loads(pickle.dumps(loaded))  # as a spawned data-loader worker gets it
    assert travelled.folder == tmp_path / "saved" and isinstance(travelled.arrays["tokens"], np.memmap)
    assert len(pickle.dumps(loaded)) < 1000, "the arrays are not copied into the pickle"


@pytest.mark.slow
def test_in_a_two_process_run_only_the_main_process_checks_the_manifest(tiny_model_dir, tmp_path):
    manifest = write_records(tmp_path / "data", RECORDS[:1] + RECORDS[3:4], repeat=4)

    def launch(output_dir: Path) -> str:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        command += [str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"), "--num_processes", "2"]
        command += [str(ROOT / "train.py"), "--base_model", str(tiny_model_dir), "--train_data", str(manifest)]
        command += ["--output_dir", str(output_dir), "--max_steps", "1", "--per_device_train_batch_size", "2"]
        command += ["--report_to", "none", "--language", "English"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        assert "processes: 2, distributed: MULTI_CPU" in result.stderr
        return result.stderr

    first = launch(tmp_path / "first")
    assert first.count("checking every line") == 1 and "checking again" not in first
    second = launch(tmp_path / "second")
    assert "checking every line" not in second and "from the index cache" in second
