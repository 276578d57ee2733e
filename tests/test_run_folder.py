"""A run's output_dir (issue 11, items 1-4 and 13): untouched until every check has passed, an earlier run never
replaced silently, one run at a time, the trained model kept when the final evaluation fails or is stopped."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from trainer_helpers import manifest, model_dir  # noqa: F401 (fixtures)

import orpo.train.loop
from orpo.cli.train import main as train_main
from orpo.config import TrainConfig
from orpo.errors import OutputDirError
from orpo.train.loop import train


def config(model_dir, manifest, output_dir, **overrides) -> TrainConfig:
    values = dict(
        base_model=str(model_dir),
        train_data=str(manifest),
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_steps=1,
        report_to=[],
    )
    return TrainConfig(**{**values, **overrides})


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def args(model_dir, manifest, output_dir, *extra) -> list[str]:
    common = ["--base_model", str(model_dir), "--train_data", str(manifest), "--output_dir", str(output_dir)]
    return common + ["--max_steps", "2", "--per_device_train_batch_size", "2", "--save_steps", "1"] + list(extra)


@pytest.fixture(scope="module")
def earlier_run(model_dir, manifest, tmp_path_factory) -> Path:  # noqa: F811
    """A run's folder as preemption leaves it: checkpoints, metrics.jsonl, train.log, config.yaml, no model."""
    output_dir = tmp_path_factory.mktemp("earlier") / "run"
    train(config(model_dir, manifest, output_dir, max_steps=2))
    for name in ("model.safetensors", "config.json", "training_curves.png"):
        (output_dir / name).unlink()
    return output_dir


def test_a_failed_resume_leaves_the_folder_as_it_was_and_the_resume_still_works(
    earlier_run,
    model_dir,
    manifest,
    tmp_path,
    capsys,  # noqa: F811
):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": {"path": "missing.wav"}, "chosen": "a", "rejected": "b"}\n')
    before = snapshot(earlier_run)
    code = train_main(args(model_dir, bad, earlier_run, "--resume_from_checkpoint", "latest"))
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert snapshot(earlier_run) == before  # config.yaml, metrics.jsonl and train.log as the earlier run left them
    code = train_main(args(model_dir, manifest, earlier_run, "--resume_from_checkpoint", "latest", "--max_steps", "3"))
    assert code == 0
    steps = [json.loads(line)["step"] for line in (earlier_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_fresh_run_into_an_earlier_run_stops_and_says_how_to_continue_or_replace(
    model_dir,
    manifest,
    tmp_path,
    capsys,  # noqa: F811
):
    output_dir = tmp_path / "run"
    assert train_main(args(model_dir, manifest, output_dir)) == 0  # 2 steps: checkpoint-1 and the model
    before = snapshot(output_dir)
    assert train_main(args(model_dir, manifest, output_dir)) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "checkpoint-1" in err and "metrics.jsonl" in err
    assert "--resume_from_checkpoint latest" in err and "--overwrite_output_dir true" in err
    assert snapshot(output_dir) == before
    assert train_main(args(model_dir, manifest, output_dir, "--overwrite_output_dir", "true")) == 0
    (replaced,) = (output_dir / "replaced").iterdir()
    assert snapshot(replaced) == before  # moved aside whole, not deleted
    assert (output_dir / "checkpoint-1").is_dir() and (output_dir / "model.safetensors").is_file()


def test_output_dir_that_is_a_file_is_a_clear_error(model_dir, manifest, tmp_path, capsys):  # noqa: F811
    target = tmp_path / "out"
    target.write_text("not a folder")
    assert train_main(args(model_dir, manifest, target)) == 2
    assert f"output_dir {target} is a file" in capsys.readouterr().err
    assert target.read_text() == "not a folder"


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs (root only: this project's tests run as root, as its CI does)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_output_dir_on_a_read_only_file_system_is_a_clear_error(
    model_dir,
    manifest,
    read_only_dir,
    monkeypatch,
    capsys,  # noqa: F811
):
    monkeypatch.setattr(orpo.train.loop, "load_whisper", lambda *a, **k: pytest.fail("weights loaded"))
    assert train_main(args(model_dir, manifest, read_only_dir / "run")) == 2
    assert "read-only file system" in capsys.readouterr().err


def hold_lock(output_dir: Path, record: dict | None, locked: bool) -> int:
    output_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(output_dir / "run.lock", os.O_RDWR | os.O_CREAT)
    if record is not None:
        os.write(fd, json.dumps(record).encode())
    if locked:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_second_run_on_a_locked_output_dir_stops_naming_the_first(model_dir, manifest, tmp_path):  # noqa: F811
    output_dir = tmp_path / "run"
    holder = {"pid": 4242, "host": "node-7", "started": "2026-12-03 10:00:00 UTC", "command": "train.py"}
    fd = hold_lock(output_dir, holder, locked=True)  # another open file: flock conflicts as with another process
    try:
        with pytest.raises(OutputDirError, match="in use by another run") as err:
            train(config(model_dir, manifest, output_dir))
        assert "pid 4242 on host node-7" in str(err.value) and "run.lock" in str(err.value)
        assert sorted(p.name for p in output_dir.iterdir()) == ["run.lock"]  # nothing written by the second run
    finally:
        os.close(fd)


def test_a_stale_lock_of_a_killed_run_is_named_and_taken_over(model_dir, manifest, tmp_path, caplog):  # noqa: F811
    output_dir = tmp_path / "run"
    os.close(hold_lock(output_dir, {"pid": 999999, "host": "node-3", "started": "yesterday"}, locked=False))
    train(config(model_dir, manifest, output_dir, max_steps=1))
    stale = [r.getMessage() for r in caplog.records if "no longer holds it" in r.getMessage()]
    assert stale and "pid 999999 on host node-3" in stale[0]
    assert not (output_dir / "run.lock").exists()  # released at the end of the run


def test_the_lock_is_held_during_the_run_and_released_when_it_fails(model_dir, manifest, tmp_path, monkeypatch):  # noqa: F811
    output_dir = tmp_path / "run"
    seen = {}

    def failing_evaluation(self, *args, **kwargs):
        with pytest.raises(OutputDirError, match="in use by another run"):
            orpo.train.run_folder.RunLock(output_dir).acquire()
        seen["held"] = json.loads((output_dir / "run.lock").read_text())["pid"]
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(orpo.train.loop.ORPOTrainer, "evaluate", failing_evaluation)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(config(model_dir, manifest, output_dir, test_data=str(manifest), eval_before_train=False))
    assert seen["held"] == os.getpid()
    assert not (output_dir / "run.lock").exists()
    # item 2: the final model is saved before the final evaluation, so its failure does not cost the training
    assert (output_dir / "model.safetensors").is_file()


def test_sigterm_during_the_final_evaluation_stops_it_with_the_model_saved(
    model_dir,
    manifest,
    tmp_path,
    monkeypatch,
    capsys,  # noqa: F811
):
    output_dir = tmp_path / "run"
    real_generate = orpo.eval.wer.generate_transcripts
    calls = []

    def generate_then_signal(*args, **kwargs):
        texts = real_generate(*args, **kwargs)
        calls.append(kwargs["desc"])  # a pass that finished
        if kwargs["desc"] == "generate (tuned)":
            signal.raise_signal(signal.SIGTERM)  # while the final evaluation runs: before its beam-search pass
        return texts

    monkeypatch.setattr(orpo.eval.wer, "generate_transcripts", generate_then_signal)
    cfg = config(model_dir, manifest, output_dir, test_data=str(manifest), compare_num_beams=2, eval_steps=0)
    assert train(cfg) == {}
    out = capsys.readouterr().out
    assert "Stopped by SIGTERM during the final evaluation" in out and "whisper-orpo evaluate --model" in out
    assert calls == ["generate (tuned)"]  # the beam-search pass stopped at its first batch
    assert (output_dir / "model.safetensors").is_file() and not (output_dir / "eval_results.json").exists()


def test_sigterm_during_an_evaluation_in_training_saves_a_checkpoint(model_dir, manifest, tmp_path, monkeypatch):  # noqa: F811
    output_dir = tmp_path / "run"
    real_generate = orpo.eval.wer.generate_transcripts

    def signal_then_generate(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(orpo.eval.wer, "generate_transcripts", signal_then_generate)
    cfg = config(
        model_dir,
        manifest,
        output_dir,
        max_steps=4,
        save_steps=0,
        eval_steps=1,
        test_data=str(manifest),
        eval_before_train=False,
    )
    assert train(cfg) == {}
    assert (output_dir / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (output_dir / "model.safetensors").exists()
