"""Log-mel features on the accelerator (features_on_device): equal to WhisperFeatureExtractor on real speech (80 and
128 mel bins), and the training step on waveforms gives the loss it gives on host features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, write_manifest
from trainer_helpers import read_metrics, save_short_window_whisper
from transformers import WhisperFeatureExtractor

from orpo.config import TrainConfig
from orpo.data.audio import load_audio
from orpo.model.log_mel import LogMel
from orpo.train.loop import train

TOLERANCE = 1e-4
SPEECH = (
    sorted((ROOT / "examples" / "demo" / "audio").glob("*.flac"))[:5]
    + sorted((ROOT / "examples" / "demo-de" / "audio").glob("*.flac"))[:3]
)


@pytest.mark.parametrize("mel_bins", [80, 128])  # 128: whisper-large-v3
def test_log_mel_on_the_device_equals_the_feature_extractor_on_real_speech(mel_bins):
    extractor = WhisperFeatureExtractor(feature_size=mel_bins)
    audio = [load_audio(path) for path in SPEECH]
    assert len(audio) == 8 and all(0.5 < len(a) / 16000 < 30 for a in audio)
    host = extractor(audio, sampling_rate=16000, return_tensors="np").input_features
    padded = np.stack([np.pad(a, (0, extractor.n_samples - len(a))) for a in audio])
    device = LogMel(extractor)(torch.from_numpy(padded)).numpy()
    assert device.shape == host.shape == (8, mel_bins, 3000)
    assert np.abs(device - host).max() <= TOLERANCE
    # and against the extractor's other (numpy, float64) implementation, one clip at a time
    numpy_path = np.stack([extractor._np_extract_fbank_features(clip[None], "cpu")[0] for clip in padded])
    assert np.abs(device - numpy_path).max() <= TOLERANCE


def test_log_mel_takes_a_whole_window_and_computes_in_float32_under_autocast():
    extractor = WhisperFeatureExtractor()
    log_mel = LogMel(extractor)
    with pytest.raises(ValueError, match="Whisper's window is 480000"):
        log_mel(torch.zeros(1, 16000))
    waveform = torch.randn(2, extractor.n_samples) * 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = log_mel(waveform)
    assert features.dtype == torch.float32
    assert torch.equal(features, log_mel(waveform))
    assert "mel_filters" not in log_mel.state_dict(), "the filters are the processor's, never a checkpoint's"


RECIPES = {
    "plain": {},
    "augmented": {"augment": True},
    # the refresh decodes and the reference log-probs are computed from the waveforms too
    "refresh-dpo-lora": {"refresh_pairs_steps": 1, "refresh_num_beams": 2, "loss_type": "dpo", "peft": "lora"},
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_run_on_device_features_follows_the_run_on_host_features(tmp_path, recipe):
    overrides = dict(RECIPES[recipe])
    augment = overrides.pop("augment", False)
    model = save_short_window_whisper(tmp_path / "model")
    data = write_manifest(tmp_path / "data", count=4)
    augmentation = tmp_path / "augment.json"
    augmentation.write_text(json.dumps({"noise": {"p": 1.0, "snr_db": [10, 20]}, "gain": {"p": 0.5, "db": [-3, 3]}}))
    runs = {}
    for on_device in (False, True):
        output_dir = tmp_path / f"on-device-{on_device}"
        cfg = TrainConfig(
            base_model=str(model),
            train_data=str(data),
            output_dir=str(output_dir),
            max_steps=3,
            per_device_train_batch_size=2,
            learning_rate=1e-3,
            logging_steps=1,
            report_to=[],
            features_on_device=on_device,
            augment_config_path=str(augmentation) if augment else None,
            generation_max_length=8,
            **overrides,
        )
        train(cfg)
        runs[on_device] = [r for r in read_metrics(output_dir) if "loss" in r]
        assert f"features_on_device: {str(on_device).lower()}" in (output_dir / "config.yaml").read_text()
    assert len(runs[True]) == 3
    for host, device in zip(runs[False], runs[True]):
        for name in ("loss", "nll_loss", "logps/rejected", "grad_norm"):
            assert device[name] == pytest.approx(host[name], rel=1e-5, abs=1e-6), (host["step"], name)
    assert runs[False][0]["loss"] != runs[False][-1]["loss"]
    if "refresh_pairs_steps" in overrides:
        for step in (1, 2):
            pairs = [(tmp_path / f"on-device-{d}" / "pairs" / f"step-{step}.jsonl").read_text() for d in (False, True)]
            assert pairs[0] == pairs[1], step
