"""A checkpoint's files as untrusted input, and saves on a full disk (issue #11, items 5, 6 and 14).

* Nothing in a checkpoint folder is unpickled with code execution: a payload planted in any of its files is
  refused with an error naming the file, and the file the payload would create never appears.
* A truncated or corrupt file of the newest checkpoint is an error that names that checkpoint and the exact
  ``--resume_from_checkpoint`` of the newest complete one before it; random states that do not restore are an
  error too, not a log line.
* A save that fills the disk (a small tmpfs: these tests mount one, as root) is a DiskFullError with the folder,
  the bytes the save needed and the bytes free; no staging folder is left, and the checkpoint before it is
  untouched and resumes.
"""

import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from trainer_helpers import manifest, model_dir  # noqa: F401 (fixtures)

import orpo.errors as errors
import orpo.train.checkpoint as checkpoint
from orpo.config import TrainConfig
from orpo.errors import CheckpointError, run_command
from orpo.train.checkpoint import complete_checkpoints
from orpo.train.loop import train


def config(model: Path, data: Path, output_dir: Path, **overrides) -> TrainConfig:
    """AdaLoRA (its checkpoints have every kind of file), 3 steps, a checkpoint after steps 1 and 2."""
    settings = dict(
        base_model=str(model),
        train_data=str(data),
        output_dir=str(output_dir),
        peft="adalora",
        lora_r=4,
        lora_alpha=8,
        adalora_tinit=1,
        adalora_tfinal=1,
        learning_rate=1e-3,
        max_steps=3,
        save_steps=1,
        save_total_limit=0,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to=[],
        seed=3,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def run_dir(model_dir, manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    train(config(model_dir, manifest, out))
    assert [step for step, _ in complete_checkpoints(out)] == [1, 2]
    return out


def copy_checkpoints(run_dir: Path, out: Path) -> Path:
    """A fresh output_dir holding the run's two checkpoints (and its recipe)."""
    out.mkdir(parents=True)
    for name in ("checkpoint-1", "checkpoint-2"):
        shutil.copytree(run_dir / name, out / name)
    return out


# --------------------------------------------------------------------------------------------------
# Item 6: no code runs from a checkpoint


class Payload:
    """Unpickled with code execution (``weights_only=False``), it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# Every file a checkpoint of this run has, and those other runs' checkpoints have (fp16's scaler, DeepSpeed's
# engine, the pickled scheduler of earlier versions).
PLANTED = [
    "model.safetensors",
    "optimizer.bin",
    "random_states_0.pkl",
    "scheduler.json",
    "adalora_state.json",
    "adalora_state.safetensors",
    "trainer_state.json",
    "scaler.pt",
    "custom_checkpoint_0.pkl",
    "pytorch_model/mp_rank_00_model_states.pt",
]
REFUSAL = {
    "torch.save": r"holds objects other than tensors and plain data \(it refers to io.open\): unpickling it could"
    " run code, so it is refused",
    "pickle": r"is not a torch.save \(zip\) file",
    "text": r"cannot be read",
    "old": "pickled by an earlier version, which Accelerate unpickles with code execution: it is not read",
}


def test_every_kind_of_file_is_in_the_run_checkpoint(run_dir):
    names = {p.name for p in (run_dir / "checkpoint-2").iterdir()}
    assert set(PLANTED[:7]) <= names, sorted(names)
    assert not any(name.startswith("custom_checkpoint") for name in names), "nothing is pickled by Accelerate"
    assert json.loads((run_dir / "checkpoint-2" / "scheduler.json").read_text())["last_epoch"] == 2


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
@pytest.mark.parametrize("name", PLANTED)
def test_a_payload_in_any_checkpoint_file_is_refused_and_never_runs(run_dir, model_dir, manifest, tmp_path, name, how):
    folder = shutil.copytree(run_dir / "checkpoint-2", tmp_path / "checkpoint-2")
    marker = tmp_path / "payload-ran"
    target = folder / name
    target.parent.mkdir(exist_ok=True)
    if how == "torch.save":
        torch.save({"state": Payload(marker)}, target)
    else:
        target.write_bytes(pickle.dumps({"state": Payload(marker)}))
    if name == "custom_checkpoint_0.pkl":
        kind = "old"
    elif target.suffix in (".json", ".safetensors"):
        kind = "text"
    else:
        kind = how
    with pytest.raises(CheckpointError) as caught:
        train(config(model_dir, manifest, tmp_path / "out", resume_from_checkpoint=str(folder)))
    message = str(caught.value)
    assert not marker.exists(), "the payload ran"
    assert target.name in message and str(folder) in message, message
    assert re.search(REFUSAL[kind], message), message


def test_deepspeed_engine_files_may_hold_only_what_deepspeed_pickles(tmp_path):
    """DeepSpeed unpickles its own files with weights_only=False: they are checked first, with only the classes
    its ZeRO-2/3 checkpoints hold allowed."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from orpo.train.checkpoint import engine_file_problems

    engine = tmp_path / "pytorch_model"
    engine.mkdir()
    legitimate = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2), "fp32": torch.ones(3)}
    torch.save({"optimizer_state_dict": legitimate}, engine / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert engine_file_problems(tmp_path) == []
    marker = tmp_path / "payload-ran"
    torch.save({"loss_scaler": Payload(marker)}, engine / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    problems = engine_file_problems(tmp_path)
    assert len(problems) == 1 and "zero_pp_rank_1_mp_rank_00_optim_states.pt holds objects other" in problems[0]
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Item 14: a broken newest checkpoint names the one before it


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "name",
    [
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "scheduler.json",
        "adalora_state.safetensors",
        "trainer_state.json",
    ],
)
def test_a_truncated_file_of_the_newest_checkpoint_names_the_complete_one_before(
    run_dir, model_dir, manifest, tmp_path, name
):
    out = copy_checkpoints(run_dir, tmp_path / "out")
    truncate(out / "checkpoint-2" / name)
    with pytest.raises(CheckpointError) as caught:
        train(config(model_dir, manifest, out, resume_from_checkpoint="latest"))
    message = str(caught.value)
    assert str(out / "checkpoint-2") in message and name in message, message
    assert message.endswith(f"--resume_from_checkpoint {out / 'checkpoint-1'}"), message


def test_the_option_the_error_gives_resumes_the_run(run_dir, model_dir, manifest, tmp_path):
    out = copy_checkpoints(run_dir, tmp_path / "out")
    truncate(out / "checkpoint-2" / "optimizer.bin")
    with pytest.raises(CheckpointError) as caught:
        train(config(model_dir, manifest, out, resume_from_checkpoint="latest"))
    earlier = str(caught.value).rsplit("--resume_from_checkpoint ", 1)[1]
    train(config(model_dir, manifest, out, resume_from_checkpoint=earlier))
    assert [step for step, _ in complete_checkpoints(out)] == [1, 2]  # the broken one replaced by a new save
    assert checkpoint.checkpoint_file_problems(out / "checkpoint-2") == []
    assert (out / "model.safetensors").is_file()


def test_random_states_that_do_not_restore_are_an_error(run_dir, model_dir, manifest, tmp_path):
    """A file that loads but holds no usable states: Accelerate catches that and only logs it."""
    out = copy_checkpoints(run_dir, tmp_path / "out")
    torch.save({"step": 0}, out / "checkpoint-2" / "random_states_0.pkl")
    with pytest.raises(CheckpointError, match="random_states_0.pkl: its random states could not be restored") as e:
        train(config(model_dir, manifest, out, resume_from_checkpoint="latest"))
    assert str(e.value).endswith(f"--resume_from_checkpoint {out / 'checkpoint-1'}")


# --------------------------------------------------------------------------------------------------
# Item 5: a full disk


@pytest.fixture
def tmpfs():
    """``mount(folder, size)``: a tmpfs of ``size`` (e.g. "10m") on ``folder``, unmounted after the test. The
    tests need root: without it they fail, they do not skip."""
    mounted = []

    def mount(folder: Path, size: str) -> Path:
        folder.mkdir(parents=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.fail(f"cannot mount a {size} tmpfs on {folder} (run as root): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:  # lazily: a failed write's file, referenced from a logged error's traceback, is open
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A file that takes all but ``leave`` bytes of ``disk``."""
    filler = disk / "filler"
    with filler.open("wb") as f:
        f.write(b"\0" * (shutil.disk_usage(disk).free - leave))
    return filler


def needed_and_free(message: str) -> tuple[int, int]:
    found = re.search(r"needs about ([\d,]+) bytes .*; ([\d,]+) bytes .* are free there", message)
    assert found, message
    return int(found.group(1).replace(",", "")), int(found.group(2).replace(",", ""))


def test_a_disk_too_small_for_a_checkpoint_is_a_clear_error(model_dir, manifest, tmp_path, tmpfs):
    """The full model's weights (7 MB) fit, its optimizer state (14 MB) does not: torch.save's own error
    ("unexpected pos ...") never says why."""
    out = tmpfs(tmp_path / "disk", "10m") / "out"
    with pytest.raises(errors.DiskFullError) as caught:
        train(config(model_dir, manifest, out, peft="none", max_steps=2))
    message = str(caught.value)
    assert message.startswith(f"no space left on the device of {out}: checkpoint-1 needs about ")
    needed, free = needed_and_free(message)
    assert needed > 20_000_000 and free < 7 << 20, message  # weights and AdamW's two moments: 3 x 7 MB; 10 MB disk
    assert f"The partly written {out / '.tmp-checkpoint-1'} was removed" in message
    assert not list(out.glob(".tmp-*")) and not (out / "checkpoint-1").exists()
    assert (out / "config.yaml").is_file() and (out / "train.log").is_file()


def test_a_disk_that_fills_after_a_checkpoint_keeps_it_and_it_resumes(
    model_dir, manifest, tmp_path, tmpfs, monkeypatch, capsys
):
    disk = tmpfs(tmp_path / "disk", "24m")
    out = disk / "out"
    real_rotate, kept = checkpoint.rotate_checkpoints, {}

    def rotate_then_fill_the_disk(output_dir, newest, limit, keep=None):
        real_rotate(output_dir, newest, limit, keep=keep)
        if not kept:
            kept["copy"] = shutil.copytree(newest, tmp_path / "kept")
            kept["filler"] = fill(disk, leave=16 << 10)

    monkeypatch.setattr(checkpoint, "rotate_checkpoints", rotate_then_fill_the_disk)
    assert run_command(lambda: train(config(model_dir, manifest, out))) == errors.USER_ERROR_EXIT
    stderr = capsys.readouterr().err
    assert f"error: no space left on the device of {out}: checkpoint-2 needs about" in stderr
    assert f"--resume_from_checkpoint latest continues from {out / 'checkpoint-1'}." in stderr
    assert not list(out.glob(".tmp-*")) and not (out / "checkpoint-2").exists()
    assert [step for step, _ in complete_checkpoints(out)] == [1]
    for path in kept["copy"].iterdir():
        assert (out / "checkpoint-1" / path.name).read_bytes() == path.read_bytes(), path.name

    kept["filler"].unlink()
    monkeypatch.setattr(checkpoint, "rotate_checkpoints", real_rotate)
    train(config(model_dir, manifest, out, resume_from_checkpoint="latest"))
    assert [step for step, _ in complete_checkpoints(out)] == [1, 2]
    assert (out / "model.safetensors").is_file()


def test_a_disk_too_small_for_the_final_model_is_a_clear_error(model_dir, manifest, tmp_path, tmpfs):
    out = tmpfs(tmp_path / "disk", "4m") / "out"
    with pytest.raises(errors.DiskFullError) as caught:
        train(config(model_dir, manifest, out, peft="lora", save_steps=0))
    message = str(caught.value)
    assert message.startswith(f"no space left on the device of {out}: the final model needs about "), message
    needed, _ = needed_and_free(message)
    assert needed > 6_000_000, message  # the merged weights alone: 7 MB
    assert not (out / ".final-model.tmp").exists() and not (out / "model.safetensors").exists()


def test_an_atomic_write_on_a_full_disk_leaves_the_old_file(tmp_path, tmpfs):
    from orpo.files import write_text_atomic

    disk = tmpfs(tmp_path / "disk", "1m")
    (disk / "results.json").write_text("old")
    with pytest.raises(errors.DiskFullError) as caught:
        write_text_atomic(disk / "results.json", "x" * 2_000_000)
    message = str(caught.value)
    assert message.startswith(f"no space left on the device of {disk}: results.json needs about 2,000,000 bytes")
    assert (disk / "results.json").read_text() == "old" and sorted(p.name for p in disk.iterdir()) == ["results.json"]
