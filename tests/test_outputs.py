"""What the commands leave behind, as a user finds it: the saved model (loads, head tied, KV cache on, processor
files), where evaluate and export write, train.log, one TensorBoard run per launch, and no DeepSpeed import
(nor its "Setting accelerator to CPU" line) in runs that never use DeepSpeed; ``--help`` answers at once."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, write_manifest
from trainer_helpers import save_short_window_whisper

from orpo.cli import evaluate as evaluate_cli
from orpo.cli import export as export_cli
from orpo.data.audio import SAMPLE_RATE, load_audio

# Run in a fresh interpreter (this one may have imported DeepSpeed in other tests): a short training run, then
# a rerun into the same output_dir (overwrite_output_dir) with a checkpoint and evaluations, evaluate without
# --out, save_final_model of a seeded model, and the DDP unwrap. Then whether DeepSpeed got imported.
WORKER = r"""
import json, os, sys
from pathlib import Path

sys.path.insert(0, os.environ["TESTS_DIR"])
import torch
from conftest import TOKENIZER_FIXTURE, tiny_whisper_config
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from orpo.config import TrainConfig
from orpo.model.load import save_final_model
from orpo.scale.launch import unwrap_model
from orpo.train.loop import train

work, model_dir, manifest = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
run = dict(base_model=model_dir, train_data=manifest, test_data=manifest, output_dir=str(work / "run"),
           max_steps=2, save_steps=1, eval_steps=1, logging_steps=1, per_device_train_batch_size=2,
           per_device_eval_batch_size=4, report_to=["tensorboard"], seed=0)
train(TrainConfig(**{**run, "max_steps": 1, "save_steps": 0, "test_data": None}))  # a first, short run
train(TrainConfig(**run, overwrite_output_dir=True))  # a rerun into the same output_dir: the first run moves aside

from orpo.cli.evaluate import main as evaluate
assert evaluate(["--model", str(work / "run"), "--data", manifest, "--max_length", "6"]) == 0

torch.manual_seed(0)
whisper = WhisperForConditionalGeneration(tiny_whisper_config())
whisper.config.use_cache = False  # as training leaves it
torch.save(whisper.state_dict(), work / "reference.pt")
save_final_model(whisper, WhisperProcessor.from_pretrained(TOKENIZER_FIXTURE), work / "saved")

import torch.distributed as dist
dist.init_process_group("gloo", init_method=f"file://{work / 'pg'}", rank=0, world_size=1)
inner = torch.nn.Linear(2, 2)
unwrapped = unwrap_model(torch.nn.parallel.DistributedDataParallel(inner))
dist.destroy_process_group()
print("REPORT " + json.dumps({"deepspeed": "deepspeed" in sys.modules, "ddp_unwrapped": unwrapped is inner}))
"""


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    work = tmp_path_factory.mktemp("outputs")
    model_dir = save_short_window_whisper(work / "model")
    manifest = write_manifest(work / "data", count=4, name="test.jsonl")
    cwd = work / "cwd"
    cwd.mkdir()
    env = dict(os.environ, TESTS_DIR=str(ROOT / "tests"), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", WORKER, str(work), str(model_dir), str(manifest)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])
    return {"work": work, "cwd": cwd, "report": report, "stdout": result.stdout, "stderr": result.stderr}


def test_no_deepspeed_import_without_a_deepspeed_launch(worker):
    assert worker["report"]["deepspeed"] is False
    assert "Setting accelerator to" not in worker["stdout"] + worker["stderr"]


def test_ddp_wrapper_is_unwrapped_without_accelerate(worker):
    assert worker["report"]["ddp_unwrapped"] is True


def test_saved_model_loads_with_its_head_tied_and_the_same_weights(worker):
    from safetensors import safe_open
    from transformers import WhisperForConditionalGeneration

    folder = worker["work"] / "saved"
    loaded = WhisperForConditionalGeneration.from_pretrained(folder)
    assert loaded.proj_out.weight.data_ptr() == loaded.model.decoder.embed_tokens.weight.data_ptr()
    reference = torch.load(worker["work"] / "reference.pt", weights_only=True)
    state = loaded.state_dict()
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"
        assert "proj_out.weight" not in f.keys()  # the tied head is stored once
    config = json.loads((folder / "config.json").read_text())
    assert config["use_cache"] is True and config["architectures"] == ["WhisperForConditionalGeneration"]


def test_output_dir_holds_what_the_processor_and_the_pipeline_need(worker):
    from transformers import WhisperProcessor, pipeline

    folder = worker["work"] / "run"
    assert json.loads((folder / "config.json").read_text())["use_cache"] is True
    for name in ("preprocessor_config.json", "tokenizer.json", "generation_config.json", "normalizer.json"):
        assert (folder / name).is_file(), name
    processor = WhisperProcessor.from_pretrained(folder)
    assert processor.feature_extractor.chunk_length == 2  # the model's own, not a default one
    asr = pipeline("automatic-speech-recognition", model=str(folder))
    clip = load_audio(next((worker["work"] / "data" / "audio").glob("*.wav")))
    out = asr({"raw": clip, "sampling_rate": SAMPLE_RATE}, generate_kwargs={"max_new_tokens": 3})
    assert isinstance(out["text"], str)


def test_train_log_has_the_step_metrics_and_the_total_wall_time(worker):
    log = (worker["work"] / "run" / "train.log").read_text()
    assert "step 1: log_odds_chosen=" in log and "loss=" in log and "step 2: " in log
    assert "step 1: eval/" in log  # the evaluation lines too
    assert log.rstrip().splitlines()[-1].split(": ", 1)[1].startswith("total wall time: ")
    assert log.count("step 1: log_odds_chosen=") == 1  # the rerun's own log, not appended to the first one's


def test_a_rerun_with_overwrite_keeps_the_earlier_run_aside(worker):
    (replaced,) = (worker["work"] / "run" / "replaced").iterdir()
    assert (replaced / "model.safetensors").is_file() and (replaced / "config.yaml").is_file()
    first = (replaced / "train.log").read_text()
    assert "step 1: log_odds_chosen=" in first and "step 2: " not in first  # the first run ran one step
    assert "moved to" in (worker["work"] / "run" / "train.log").read_text()  # said, not silent


def test_each_launch_is_a_tensorboard_run_of_its_own(worker):
    run_dir = worker["work"] / "run"
    for folder in (run_dir / "whisper-orpo", *(run_dir / "replaced").glob("*/whisper-orpo")):
        runs = sorted(p for p in folder.iterdir() if p.is_dir())
        assert len(runs) == 1, runs
        assert list(runs[0].glob("events.out.tfevents.*")), runs[0]
        assert not list(folder.glob("events.out.tfevents.*"))
    assert len(list((run_dir / "replaced").glob("*/whisper-orpo"))) == 1


def test_evaluate_writes_into_the_model_folder_by_default(worker):
    results = worker["work"] / "run" / "eval_test.json"
    data = json.loads(results.read_text())
    assert data["model"] == str(worker["work"] / "run") and "eval/wer" in data["metrics"]
    assert "model_source" not in json.loads((worker["work"] / "run" / "eval_results.json").read_text())  # the run's
    assert f"wrote {results}" in worker["stdout"]
    assert not list(worker["cwd"].iterdir())  # nothing loose in the current directory


def test_evaluate_log_names_the_model_once(tiny_model_dir, tmp_path, monkeypatch, caplog):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    manifest = write_manifest(tmp_path / "data", count=2, name="dev.jsonl")
    out = tmp_path / "named" / "r.json"
    monkeypatch.chdir(tmp_path / "data")
    caplog.set_level(logging.INFO)
    assert evaluate_cli.main(["--model", str(model), "--data", str(manifest), "--max_length", "6"]) == 0
    assert (
        evaluate_cli.main(["--model", str(model), "--data", str(manifest), "--max_length", "6", "--out", str(out)]) == 0
    )
    messages = [r.getMessage() for r in caplog.records]
    assert f"evaluating model {model} on 2 clips" in messages
    assert not any("model: model" in m for m in messages)
    assert (model / "eval_dev.json").is_file() and out.is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["audio", "dev.jsonl"]


def test_export_writes_only_where_it_is_told(tiny_model_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("ctranslate2")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "exported" / "hf"
    assert export_cli.main(["--checkpoint", str(tiny_model_dir), "--out", str(out), "--ct2", "int8"]) == 0
    assert (out / "model.safetensors").is_file() and (out.parent / "hf_ct2" / "model.bin").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf", "hf_ct2"]
    assert not list(cwd.iterdir())


# ---------------------------------------------------------------------------------------------------------
# --help: instant, without torch or DeepSpeed

COMMANDS = ["train", "evaluate", "make-pairs", "export", "plot", "memory", "fetch-model"]


def help_command(name: str) -> list[str]:
    if name == "train.py":
        return [sys.executable, str(ROOT / "train.py"), "--help"]
    return [sys.executable, "-m", "orpo.cli.main", name, "--help"]


@pytest.mark.parametrize("name", ["train.py", *COMMANDS])
def test_help_is_instant_and_imports_neither_torch_nor_deepspeed(name, tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [help_command(name)[0], "-X", "importtime", *help_command(name)[1:]],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "deepspeed", "transformers"}, sorted(imported & {"torch", "deepspeed"})
    assert elapsed < 2.0, f"{name} --help took {elapsed:.2f} s"


# ---------------------------------------------------------------------------------------------------------
# --help texts: each key's default, stated once


@pytest.mark.parametrize("name", ["evaluate", "make-pairs", "export"])
def test_help_states_each_default_exactly_once(name):
    import dataclasses
    import re

    from orpo.config import EvaluateConfig, ExportConfig, MakePairsConfig, build_parser

    cls = {"evaluate": EvaluateConfig, "make-pairs": MakePairsConfig, "export": ExportConfig}[name]
    helps = {a.dest: a.help for a in build_parser(cls, f"whisper-orpo {name}")._actions if a.option_strings}
    for f in dataclasses.fields(cls):
        text = helps[f.name]
        if f.metadata.get("required"):
            assert text.endswith("(required)") and "default" not in text.lower(), (f.name, text)
            continue
        default = ", ".join(f.default) if isinstance(f.default, list) else str(f.default)
        assert text.endswith(f"(default: {default})"), (f.name, text)
        assert text.lower().count("default") == 1, (f.name, text)  # no second statement by hand
        assert not re.search(r"\((None|unset)\s*:", text), (f.name, text)  # nor "(None: ...)" before it
