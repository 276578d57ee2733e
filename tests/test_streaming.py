"""Training data read as a stream (streaming: true): WebDataset shards, a saved Hugging Face dataset and parquet files
train; a run stopped and resumed follows the uninterrupted run's per-step losses (with and without data-loader
workers, and over two processes); length grouping and several rejected transcripts work inside the shuffle buffer;
a bad sample stops the run naming its shard and key, or with max_bad_samples is skipped, listed and counted."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from itertools import islice
from pathlib import Path

import pytest
from conftest import ROOT, SENTENCES, write_clip
from test_checkpoint import send_signal_during_micro_batch
from trainer_helpers import read_metrics, save_short_window_whisper

from orpo.config import TrainConfig
from orpo.data.shards import write_shards
from orpo.data.stream import StreamedPreferences
from orpo.errors import ManifestError
from orpo.train.loop import train

STEPS = 8  # 12 clips in batches of 2: an epoch and a third


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_short_window_whisper(tmp_path_factory.mktemp("tiny"), seed=2, dropout=0.1)


def records(folder: Path, count: int = 12) -> list[dict]:
    """Preference records over 1 s clips; every third has two rejected transcripts."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        chosen, rejected = SENTENCES[i % len(SENTENCES)]
        clip = write_clip(folder / f"clip-{i}.wav", 1.0 + 0.05 * i, seed=i)
        several = [rejected, rejected + " again"] if i % 3 == 0 else rejected
        rows.append({"audio": str(clip), "chosen": chosen, "rejected": several, "language": "en"})
    return rows


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """The same 12 pairs as WebDataset shards (5 per shard), a dataset saved with save_to_disk, parquet files."""
    import datasets

    folder = tmp_path_factory.mktemp("stream-data")
    rows = records(folder / "clips")
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_shards(str(manifest), str(folder / "shards"), samples_per_shard=5)
    table = {key: [row[key] for row in rows] for key in ("audio", "chosen", "language")}
    table["rejected"] = [row["rejected"] if isinstance(row["rejected"], list) else [row["rejected"]] for row in rows]
    dataset = datasets.Dataset.from_dict(table)
    dataset.save_to_disk(str(folder / "saved"))
    (folder / "parquet").mkdir()
    dataset.select(range(6)).to_parquet(str(folder / "parquet" / "part-0.parquet"))
    dataset.select(range(6, 12)).to_parquet(str(folder / "parquet" / "part-1.parquet"))
    return {
        "webdataset": str(folder / "shards" / "train-*.tar"),
        "saved": str(folder / "saved"),
        "parquet": str(folder / "parquet" / "*.parquet"),
    }


def config(model_dir: Path, data: str, output_dir: Path, **overrides) -> TrainConfig:
    settings = dict(
        base_model=str(model_dir),
        train_data=data,
        streaming=True,
        shuffle_buffer=5,
        output_dir=str(output_dir),
        learning_rate=1e-3,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to=[],
        seed=7,
    )
    return TrainConfig(**(settings | overrides))


def losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir) if "loss" in r]


@pytest.mark.parametrize(("source", "workers"), [("webdataset", 0), ("webdataset", 2), ("saved", 0), ("parquet", 0)])
def test_a_streamed_run_stopped_and_resumed_follows_the_uninterrupted_one(
    model_dir, sources, tmp_path, source, workers
):
    recipe = dict(num_workers=workers, group_by_length=source == "saved")
    train(config(model_dir, sources[source], tmp_path / "A", **recipe))
    mp = pytest.MonkeyPatch()
    try:
        send_signal_during_micro_batch(mp, micro_batch=3)  # stopped after step 3, inside the first shuffle block
        assert train(config(model_dir, sources[source], tmp_path / "B", **recipe)) == {}
    finally:
        mp.undo()
    state = tmp_path / "B" / "checkpoint-3" / "stream_0.json"
    assert state.is_file(), "the stream's position is in the checkpoint"
    train(config(model_dir, sources[source], tmp_path / "B", resume_from_checkpoint="latest", **recipe))
    uninterrupted, resumed = losses(tmp_path / "A"), losses(tmp_path / "B")
    assert len(uninterrupted) == len(resumed) == STEPS
    assert resumed == pytest.approx(uninterrupted, abs=1e-6)
    assert len(set(round(x, 5) for x in uninterrupted)) > 1


def stream_of(sources, **settings) -> StreamedPreferences:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperProcessor

    from orpo.data.hf import open_stream
    from orpo.data.tokens import WhisperTokens

    processor = WhisperProcessor.from_pretrained(ROOT / "tests" / "fixtures" / "whisper_tokenizer")
    tokens = WhisperTokens.for_model(processor.tokenizer, WhisperConfig())
    source, label, base = open_stream(sources["webdataset"], "train", None)
    columns = {"audio": "audio", "chosen": "chosen", "rejected": "rejected", "language": None}
    defaults = dict(seed=1, shuffle_buffer=6, batch_size=2, group_by_length=False, min_len=0.0, max_len=30.0)
    defaults |= dict(language=None, raw_audio=False, columns=columns, rank=0, world=1)
    return StreamedPreferences(source, label, base, defaults | settings, tokens, WhisperFeatureExtractor())


def test_a_stream_reads_every_sample_once_an_epoch_in_a_seeded_order_grouped_by_length(sources):
    items = list(islice(iter(stream_of(sources)), 24))
    keys = [item["source"].rsplit("sample ", 1)[1] for item in items]
    assert sorted(keys[:12]) == sorted(keys[12:]) == [f"{i:09d}" for i in range(12)], "each sample once an epoch"
    assert keys[:12] != keys[12:], "each epoch in its own order"
    assert [len(item["segments"]) for item in items[:12]].count(3) == 4, "several rejected transcripts kept"
    assert keys == [
        i["source"].rsplit("sample ", 1)[1] for i in __import__("itertools").islice(iter(stream_of(sources)), 24)
    ]
    grouped = list(__import__("itertools").islice(iter(stream_of(sources, group_by_length=True)), 6))
    lengths = [sum(len(ids) - 1 for ids, _ in item["segments"]) for item in grouped]
    # the first block (6 rows) in batches of 2 of similar length: each batch's pair sorted longest first
    assert all(lengths[k] >= lengths[k + 1] for k in range(0, 6, 2))
    assert sorted(lengths, reverse=True)[:2] in [lengths[k : k + 2] for k in range(0, 6, 2)]


def test_data_loader_workers_read_every_shard_between_them(sources):
    """The process's part is split between its workers once (by datasets), so every sample is read."""
    from torch.utils.data import DataLoader

    loader = DataLoader(stream_of(sources), batch_size=None, num_workers=2)
    keys = [item["source"].rsplit("sample ", 1)[1] for item in islice(iter(loader), 40)]
    assert set(keys) == {f"{i:09d}" for i in range(12)}


def test_a_part_with_nothing_to_train_on_is_an_error_not_an_endless_loop(sources):
    stream = stream_of(sources, min_len=20.0)  # every 1 s clip is outside the length limits
    with pytest.raises(ManifestError, match="gave no training sample.*outside the length limits"):
        next(iter(stream))


def corrupt_shard(shards: str, folder: Path) -> str:
    """A copy of the shards in which sample 000000006's audio is not audio and sample 000000008 has no chosen."""
    import glob

    folder.mkdir()
    for path in sorted(glob.glob(shards)):
        with tarfile.open(path) as source, tarfile.open(folder / Path(path).name, "w") as target:
            for member in source.getmembers():
                payload = source.extractfile(member).read()
                if member.name == "000000006.wav":
                    payload = b"not audio at all" * 10
                if member.name == "000000008.json":
                    payload = json.dumps({k: v for k, v in json.loads(payload).items() if k != "chosen"}).encode()
                member.size = len(payload)
                target.addfile(member, io.BytesIO(payload))
    return str(folder / "train-*.tar")


def test_a_bad_sample_stops_the_run_naming_its_shard_and_key(model_dir, sources, tmp_path):
    data = corrupt_shard(sources["webdataset"], tmp_path / "bad")
    with pytest.raises(ManifestError, match=r"train-000001\.tar, sample 00000000[68]") as error:
        train(config(model_dir, data, tmp_path / "run", shuffle_buffer=12))
    assert "max_bad_samples: 0" in str(error.value)


def test_max_bad_samples_skips_them_listed_and_counted(model_dir, sources, tmp_path):
    data = corrupt_shard(sources["webdataset"], tmp_path / "bad")
    output_dir = tmp_path / "run"
    # six steps of 2 from 10 good samples: the first epoch's 2 bad ones, then some of the second's
    train(config(model_dir, data, output_dir, max_bad_samples=4, max_steps=6, shuffle_buffer=12))
    listed = [json.loads(line) for line in (output_dir / "bad_samples.jsonl").read_text().splitlines()]
    assert {r["source"].rsplit("sample ", 1)[1] for r in listed} == {"000000006", "000000008"}
    reasons = " ".join(r["reason"] for r in listed)
    assert "cannot decode" in reasons and "'chosen' is missing" in reasons
    counts = [r["bad_samples"] for r in read_metrics(output_dir) if "bad_samples" in r]
    assert counts[-1] == len(listed) and counts == sorted(counts)
    assert len([r for r in read_metrics(output_dir) if "loss" in r]) == 6


def test_a_skipped_sample_is_never_replaced_by_another(sources, tmp_path):
    stream = stream_of({"webdataset": corrupt_shard(sources["webdataset"], tmp_path / "bad")}, shuffle_buffer=12)
    items = list(islice(iter(stream), 10))  # the first epoch: 12 rows, 2 of them bad
    keys = [item["source"].rsplit("sample ", 1)[1] for item in items]
    assert sorted(keys) == [f"{i:09d}" for i in range(12) if i not in (6, 8)]
    reported = [r["source"].rsplit("sample ", 1)[1] for item in items for r in item.get("bad_samples", [])]
    assert sorted(reported) == ["000000006", "000000008"]


@pytest.mark.slow
def test_two_processes_stream_their_own_parts_and_resume_exactly(tiny_model_dir, sources, tmp_path):
    """A dataset saved with save_to_disk, streamed (the WebDataset reader is the same IterableDataset)."""
    source = "saved"

    def launch(output_dir: Path, *extra: str) -> str:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        command += [str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"), "--num_processes", "2"]
        command += [str(ROOT / "train.py"), "--base_model", str(tiny_model_dir), "--train_data", sources[source]]
        command += ["--streaming", "true", "--shuffle_buffer", "4", "--output_dir", str(output_dir)]
        command += ["--max_steps", "6", "--per_device_train_batch_size", "2", "--logging_steps", "1"]
        command += ["--report_to", "none", "--learning_rate", "1e-3", "--save_steps", "3", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        assert "processes: 2, distributed: MULTI_CPU" in result.stderr
        return result.stderr

    launch(tmp_path / "A")
    assert {p.name for p in (tmp_path / "A" / "checkpoint-3").glob("stream_*.json")} == {
        "stream_0.json",
        "stream_1.json",
    }
    # resume the uninterrupted run's step-3 checkpoint into its own folder: steps 4-6 must come out the same
    resumed = tmp_path / "B"
    resumed.mkdir()
    shutil.copytree(tmp_path / "A" / "checkpoint-3", resumed / "checkpoint-3")
    launch(resumed, "--resume_from_checkpoint", "latest")
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "A") if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    assert sorted(b) == [4, 5, 6] and all(b[s] == pytest.approx(a[s], abs=1e-6) for s in b)
