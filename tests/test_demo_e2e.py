"""The README's demo command on real Whisper tiny.en weights, then transcription through the ASR pipeline."""

import json
import subprocess
import sys

import jiwer
import pytest
from conftest import ROOT

from orpo.data.audio import SAMPLE_RATE, load_audio

pytestmark = pytest.mark.slow


def test_demo_recipe_trains_and_the_model_transcribes(tiny_en_dir, tmp_path):
    output_dir = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "recipes/demo.yaml",
            "--base_model",
            str(tiny_en_dir),
            "--output_dir",
            str(output_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "train: 100%" in result.stderr, "no progress bar"
    assert "rewards/margins=" in result.stdout + result.stderr, "no metrics printed"
    table = json.loads((output_dir / "eval_results.json").read_text())["quality_table"]
    assert [(row["model"], row["decoding"]) for row in table] == [
        ("base", "greedy"),
        ("base", "beam 5"),
        ("ORPO (alpha 0.1)", "greedy"),
        ("ORPO (alpha 0.1)", "beam 5"),
        ("plain fine-tuning (alpha 0)", "greedy"),
    ]
    assert all(row["wer"] is not None for row in table)
    assert "| plain fine-tuning (alpha 0) |" in result.stdout, "the closing table is not printed"

    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    assert any("eval/rewards/accuracies" in r for r in records)

    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(output_dir))
    manifest = [json.loads(line) for line in (ROOT / "examples/demo/test.jsonl").read_text().splitlines()]
    references, hypotheses = [], []
    for item in manifest[:4]:
        audio = load_audio(ROOT / "examples/demo" / item["audio"]["path"])  # no ffmpeg needed
        hypotheses.append(asr({"raw": audio, "sampling_rate": SAMPLE_RATE})["text"].lower())
        references.append(item["chosen"].lower())
    assert all(h.strip() for h in hypotheses)
    assert jiwer.wer(references, hypotheses) < 0.6, list(zip(references, hypotheses))


def test_demo_with_pairs_refreshed_from_tiny_en(tiny_en_dir, tmp_path):
    """Real tiny.en on the demo clips with refresh_pairs_steps: the pairs of each refresh are written, the
    on-policy training WER is logged, and the run finishes."""
    output_dir = tmp_path / "refresh"
    command = [sys.executable, "train.py", "--config", "recipes/demo.yaml", "--base_model", str(tiny_en_dir)]
    command += ["--output_dir", str(output_dir), "--max_steps", "5", "--refresh_pairs_steps", "2"]
    command += ["--refresh_clips", "8", "--refresh_num_rejected", "2", "--per_device_eval_batch_size", "8"]
    command += ["--test_data", "none", "--eval_before_train", "false", "--compare_num_beams", "0"]
    command += ["--compare_sft", "false", "--logging_steps", "1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "refresh pairs (step 2)" in result.stderr, "no progress bar for the refresh"
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    refreshes = [r for r in records if "refresh/wer" in r]
    assert [r["step"] for r in refreshes] == [2, 4]
    assert all(r["refresh/clips_decoded"] == 8 and 0 <= r["refresh/wer"] < 1 for r in refreshes)
    demo = {json.loads(line)["chosen"] for line in (ROOT / "examples/demo/train.jsonl").read_text().splitlines()}
    for step in (2, 4):
        pairs = [json.loads(line) for line in (output_dir / "pairs" / f"step-{step}.jsonl").read_text().splitlines()]
        assert len(pairs) == 32 and {p["chosen"] for p in pairs} == demo
    print("on-policy training WER at steps 2 and 4:", [round(r["refresh/wer"], 4) for r in refreshes])


def test_the_demo_as_webdataset_shards_trains_tiny_en_streamed(tiny_en_dir, tmp_path):
    """whisper-orpo make-shards writes the demo's training manifest as tar shards; the demo recipe trains real
    tiny.en on them read as a stream."""
    shards = tmp_path / "shards"
    made = subprocess.run(
        [sys.executable, "-m", "orpo.cli.main", "make-shards", "examples/demo/train.jsonl", str(shards)]
        + ["--samples_per_shard", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    assert sorted(p.name for p in shards.iterdir()) == [f"train-{k:06d}.tar" for k in range(4)]
    output_dir = tmp_path / "streamed"
    command = [sys.executable, "train.py", "--config", "recipes/demo.yaml", "--base_model", str(tiny_en_dir)]
    command += ["--train_data", str(shards / "*.tar"), "--streaming", "true", "--shuffle_buffer", "16"]
    command += ["--output_dir", str(output_dir), "--max_steps", "4", "--logging_steps", "1", "--test_data", "none"]
    command += ["--eval_before_train", "false", "--compare_num_beams", "0", "--compare_sft", "false"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "read as a stream" in result.stderr
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(r["bad_samples"] == 0 for r in records if "loss" in r)
    assert (output_dir / "model.safetensors").is_file()
