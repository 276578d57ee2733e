"""Start-up checks of the training operations: quantisation needs CUDA and adapters, trackers must exist,
and output_dir gets the resolved config, train.log and metrics.jsonl."""

import pytest
import torch
import yaml
from conftest import write_manifest
from trainer_helpers import save_short_window_whisper

from orpo.config import TrainConfig, parse_args
from orpo.errors import ConfigError
from orpo.model.load import check_hardware, quantization_config
from orpo.train.logs import check_trackers
from orpo.train.loop import train

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


@no_cuda
@pytest.mark.parametrize("key", ["load_in_8bit", "load_in_4bit"])
def test_quantised_loading_needs_cuda(key):
    with pytest.raises(
        ConfigError, match=f"^{key} needs a CUDA GPU \\(bitsandbytes\\); this machine has none. Set --{key} false.$"
    ):
        check_hardware(TrainConfig(peft="lora", **{key: True}))


@no_cuda
def test_quantised_loading_fails_before_any_weights_load(tmp_path):
    cfg = TrainConfig(
        base_model=str(tmp_path / "nowhere"), peft="lora", load_in_4bit=True, output_dir=str(tmp_path / "out")
    )
    with pytest.raises(ConfigError, match="load_in_4bit needs a CUDA GPU"):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_quantisation_settings_are_checked():
    with pytest.raises(ConfigError, match="load_in_8bit and load_in_4bit cannot both be true"):
        TrainConfig(peft="lora", load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(
        ConfigError,
        match="^command line \\(--load_in_4bit\\): load_in_4bit trains adapters on frozen quantised weights: "
        "set peft to lora or adalora$",
    ):
        parse_args(["--load_in_4bit", "true"])
    four = quantization_config(TrainConfig(peft="lora", load_in_4bit=True, mixed_precision="bf16"))
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(TrainConfig(peft="lora", load_in_8bit=True)).load_in_8bit
    assert quantization_config(TrainConfig()) is None


def test_unknown_tracker_is_a_config_error(tmp_path):
    with pytest.raises(
        ConfigError,
        match="^command line \\(--report_to\\): report_to: unknown tracker 'tensorbord'; "
        ".* Did you mean 'tensorboard'\\?$",
    ):
        parse_args(["--report_to", "tensorboard,tensorbord"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 1\nreport_to: [mlfow]\n")
    with pytest.raises(ConfigError, match=f"^recipe {recipe}: report_to: unknown tracker 'mlfow'"):
        parse_args(["--config", str(recipe)])
    assert parse_args(["--report_to", "none"]).report_to == []
    assert parse_args(["--report_to", "tensorboard,wandb,mlflow"]).report_to == ["tensorboard", "wandb", "mlflow"]


def test_tracker_that_is_not_installed_is_a_config_error(monkeypatch):
    import accelerate.tracking
    from accelerate.utils import LoggerType

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    check_trackers(TrainConfig(report_to=["tensorboard"]))
    with pytest.raises(
        ConfigError,
        match="^report_to names wandb, but its package is not installed here: "
        "pip install wandb, or leave wandb out of report_to$",
    ):
        check_trackers(TrainConfig(report_to=["tensorboard", "wandb"]))


def test_output_dir_gets_config_log_metrics_and_tensorboard(tmp_path):
    model_dir = save_short_window_whisper(tmp_path / "model")
    manifest = write_manifest(tmp_path / "data", count=2)
    out = tmp_path / "out"
    train(
        TrainConfig(
            base_model=str(model_dir),
            train_data=str(manifest),
            output_dir=str(out),
            max_steps=2,
            per_device_train_batch_size=2,
            logging_steps=1,
            report_to=["tensorboard"],
        )
    )
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 2
    log = (out / "train.log").read_text()
    assert "training clips: 2" in log and "saved the final model" in log
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert list(out.glob("whisper-orpo/*/events.out.tfevents.*"))
