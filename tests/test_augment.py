"""Audio augmentation: each effect does what it says within its range, training data only, reproducibly."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import soundfile as sf
from conftest import write_manifest

from orpo.config import TrainConfig
from orpo.data.audio import load_audio
from orpo.data.augment import Augmenter, read_augment_config
from orpo.data.dataset import PreferenceDataset, build_dataset
from orpo.data.tokens import WhisperTokens
from orpo.errors import AugmentConfigError, ConfigError

RATE = 16000


def sine(freq=440.0, seconds=1.0, amplitude=0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / RATE)[np.argmax(spectrum)])


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def augmenter(tmp_path, settings: dict, seed: int = 0, name: str = "augment.yaml") -> Augmenter:
    path = tmp_path / name
    path.write_text(json.dumps(settings))  # JSON is YAML too
    return Augmenter.from_file(path, seed=seed)


def test_white_noise_snr_within_range(tmp_path):
    aug = augmenter(tmp_path, {"noise": {"p": 1.0, "snr_db": [10, 20]}})
    clean = sine()
    snrs = []
    for index in range(12):
        noisy = aug(clean, index, 0)
        assert noisy.shape == clean.shape and noisy.dtype == np.float32
        snrs.append(20 * np.log10(rms(clean) / rms(noisy - clean)))
    assert all(10 - 0.25 <= s <= 20 + 0.25 for s in snrs), snrs
    assert max(snrs) - min(snrs) > 2  # drawn from the range, not fixed


def test_background_noise_from_folder_snr_within_range(tmp_path):
    noises = tmp_path / "noises"
    noises.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # shorter than the clip: looped to its length
        sf.write(str(noises / f"n{i}.wav"), (0.1 * rng.standard_normal(RATE // 3)).astype(np.float32), RATE)
    aug = augmenter(tmp_path, {"background_noise": {"p": 1.0, "folder": "noises", "snr_db": [3, 6]}})
    clean = sine()
    for index in range(6):
        noisy = aug(clean, index, 0)
        snr = 20 * np.log10(rms(clean) / rms(noisy - clean))
        assert 3 - 0.05 <= snr <= 6 + 0.05, snr


def test_speed_scales_duration_and_pitch_by_the_factor(tmp_path):
    aug = augmenter(tmp_path, {"speed": {"p": 1.0, "factor": [0.8, 1.25]}})
    clean = sine(440.0, seconds=2.0)
    factors = []
    for index in range(8):
        fast = aug(clean, index, 0)
        factor = len(clean) / len(fast)  # duration scaled by 1/factor
        assert 0.8 - 1e-3 <= factor <= 1.25 + 1e-3
        assert peak_hz(fast) == pytest.approx(440.0 * factor, abs=2.0)  # and pitch by factor
        factors.append(factor)
    assert max(factors) - min(factors) > 0.1


def test_speed_never_makes_a_clip_longer_than_30_s(tmp_path):
    aug = augmenter(tmp_path, {"speed": {"p": 1.0, "factor": [0.5, 0.5]}})
    clip = np.zeros(29 * RATE, dtype=np.float32)
    assert len(aug(clip, 0, 0)) <= 30 * RATE + 1
    assert len(aug(np.zeros(RATE, dtype=np.float32), 0, 0)) == 2 * RATE


def test_pitch_shift_moves_the_frequency_not_the_duration(tmp_path):
    aug = augmenter(tmp_path, {"pitch": {"p": 1.0, "semitones": [2, 4]}})
    clean = sine(440.0, seconds=1.0)
    for index in range(4):
        shifted = aug(clean, index, 0)
        assert len(shifted) == len(clean)
        ratio = peak_hz(shifted) / 440.0
        assert 2 ** (2 / 12) - 0.01 <= ratio <= 2 ** (4 / 12) + 0.01, ratio


def test_gain_in_db_within_range(tmp_path):
    aug = augmenter(tmp_path, {"gain": {"p": 1.0, "db": [-6, 3]}})
    clean = sine()
    gains = []
    for index in range(10):
        louder = aug(clean, index, 0)
        gain_db = 20 * np.log10(rms(louder) / rms(clean))
        assert -6 - 1e-3 <= gain_db <= 3 + 1e-3
        np.testing.assert_allclose(louder, clean * 10 ** (gain_db / 20), atol=1e-6)  # a pure scaling
        gains.append(gain_db)
    assert max(gains) - min(gains) > 1


def onset_seconds(audio: np.ndarray) -> float:
    return float(np.argmax(np.abs(audio) > 1e-4)) / RATE


@pytest.mark.parametrize("low, high", [(0.1, 0.3), (-0.3, -0.1)])
def test_time_shift_moves_the_onset(tmp_path, low, high):
    aug = augmenter(tmp_path, {"shift": {"p": 1.0, "seconds": [low, high]}})
    clip = np.concatenate([np.zeros(RATE // 2, dtype=np.float32), sine(440.0, seconds=0.5)])
    assert onset_seconds(clip) == pytest.approx(0.5, abs=1e-3)
    for index in range(5):
        shifted = aug(clip, index, 0)
        moved = onset_seconds(shifted) - 0.5
        assert low - 1e-3 <= moved <= high + 1e-3, moved
        if moved > 0:  # a delay keeps the whole tone: silence is added in front
            assert rms(shifted) * np.sqrt(len(shifted)) == pytest.approx(rms(clip) * np.sqrt(len(clip)), rel=1e-4)


def test_probability_zero_leaves_audio_untouched_and_half_applies_about_half(tmp_path):
    clean = sine()
    never = augmenter(tmp_path, {"gain": {"p": 0.0, "db": [-6, 6]}, "noise": {"p": 0, "snr_db": [5, 10]}})
    assert all(np.array_equal(never(clean, i, 0), clean) for i in range(10))
    half = augmenter(tmp_path, {"gain": {"p": 0.5, "db": [3, 6]}}, name="half.yaml")
    applied = sum(not np.array_equal(half(clean, i, 0), clean) for i in range(200))
    assert 70 <= applied <= 130


def test_same_seed_index_and_epoch_give_the_same_audio(tmp_path):
    settings = {
        "speed": {"p": 0.7, "factor": [0.9, 1.1]},
        "pitch": {"p": 0.5, "semitones": [-1, 1]},
        "shift": {"p": 0.5, "seconds": [0, 0.2]},
        "gain": {"p": 0.8, "db": [-3, 3]},
        "noise": {"p": 1.0, "snr_db": [10, 30]},
    }
    clean = sine()
    a, b = augmenter(tmp_path, settings, seed=7), augmenter(tmp_path, settings, seed=7, name="copy.yaml")
    first = a(clean, 3, 1)
    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.random())
    random.seed(123)
    np.random.seed(123)
    for _ in range(5):  # other draws from the global generators change nothing
        a(clean, 11, 0)
    assert (random.random(), np.random.random()) == before  # and the global state is left as it was
    random.seed(999)
    np.random.seed(999)
    assert np.array_equal(b(clean, 3, 1), first)
    assert np.array_equal(a(clean, 3, 1), first)
    assert not np.array_equal(a(clean, 3, 2), first)  # another epoch
    assert not np.array_equal(a(clean, 4, 1), first)  # another clip
    assert not np.array_equal(augmenter(tmp_path, settings, seed=8, name="other.yaml")(clean, 3, 1), first)


def test_augmenter_pickles_for_dataloader_workers(tmp_path):
    """Spawned DataLoader workers (macOS, or CUDA with spawn) receive the dataset, augmenter included, pickled."""
    import pickle

    noises = tmp_path / "noises"
    noises.mkdir()
    sf.write(str(noises / "n.wav"), (0.1 * np.random.default_rng(0).standard_normal(RATE)).astype(np.float32), RATE)
    aug = augmenter(
        tmp_path,
        {
            "speed": {"p": 1, "factor": [0.9, 1.1]},
            "shift": {"p": 1, "seconds": [0, 0.2]},
            "pitch": {"p": 1, "semitones": [-1, 1]},
            "gain": {"p": 1, "db": [-3, 3]},
            "noise": {"p": 1, "snr_db": [10, 20]},
            "background_noise": {"p": 1, "snr_db": [10, 20], "folder": "noises"},
        },
    )
    copy = pickle.loads(pickle.dumps(aug))
    clean = sine()
    np.testing.assert_array_equal(copy(clean, 5, 2), aug(clean, 5, 2))


# ---------------------------------------------------------------------------------------------------------
# Configuration errors


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"reverb": {"p": 0.5}}, "unknown augmentation 'reverb'"),
        ({"nosie": {"p": 0.5, "snr_db": [1, 2]}}, "Did you mean 'noise'?"),
        ({"speed": {"p": 0.5, "factor": [0.9, 1.1], "facter": 1}}, "key 'speed.facter' is unknown"),
        ({"speed": {"p": 0.5}}, "key 'speed.factor' is missing"),
        ({"gain": {"db": [1, 2]}}, "key 'gain.p' is missing"),
        ({"gain": {"p": 1.5, "db": [1, 2]}}, "key 'gain.p' must be a probability in [0, 1]"),
        ({"gain": {"p": True, "db": [1, 2]}}, "key 'gain.p' must be a probability"),
        ({"gain": {"p": 0.5, "db": [6, -6]}}, "key 'gain.db': low 6.0 is above high -6.0"),
        ({"gain": {"p": 0.5, "db": [1, 2, 3]}}, "key 'gain.db' must be a range [low, high]"),
        ({"gain": {"p": 0.5, "db": "loud"}}, "key 'gain.db' must be a range [low, high]"),
        ({"speed": {"p": 0.5, "factor": [0, 1.1]}}, "key 'speed.factor': [0.0, 1.1] is outside (0.0, 4.0]"),
        ({"pitch": {"p": 0.5, "semitones": [-30, 0]}}, "key 'pitch.semitones'"),
        ({"shift": {"p": 0.5, "seconds": [0, 40]}}, "key 'shift.seconds'"),
        ({"background_noise": {"p": 0.5, "snr_db": [1, 2], "folder": "nowhere"}}, "key 'background_noise.folder'"),
        ({"gain": [1, 2]}, "key 'gain' must be a mapping"),
        ([1, 2], "expected a mapping of effect: settings"),
        ({}, "expected a mapping of effect: settings"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, settings, message):
    path = tmp_path / "aug.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(AugmentConfigError) as err:
        read_augment_config(path)
    assert str(err.value).startswith(f"{path}:"), str(err.value)
    assert message in str(err.value)
    assert isinstance(err.value, ConfigError)  # train.py prints it as a configuration error


def test_empty_noise_folder_and_missing_file_and_bad_yaml(tmp_path):
    (tmp_path / "empty").mkdir()
    path = tmp_path / "aug.yaml"
    path.write_text("background_noise:\n  p: 0.5\n  snr_db: [1, 2]\n  folder: empty\n")
    with pytest.raises(AugmentConfigError, match="no audio files"):
        read_augment_config(path)
    with pytest.raises(AugmentConfigError, match="does not exist"):
        read_augment_config(tmp_path / "missing.yaml")
    path.write_text("gain: [p: 1\n")
    with pytest.raises(AugmentConfigError, match="not valid YAML"):
        read_augment_config(path)


def test_yaml_config_and_single_number_range(tmp_path):
    path = tmp_path / "aug.yml"
    path.write_text("gain:\n  p: 1\n  db: 6   # a fixed value\nnoise: {p: 0.25, snr_db: [5, 10]}\n")
    config = read_augment_config(path)
    assert config == {"gain": {"p": 1.0, "range": (6.0, 6.0)}, "noise": {"p": 0.25, "range": (5.0, 10.0)}}


def test_timestamps_refuse_speed_and_shift(tmp_path):
    path = tmp_path / "aug.yaml"
    path.write_text("gain: {p: 1, db: [-3, 3]}\nshift: {p: 0.5, seconds: [0, 0.2]}\n")
    with pytest.raises(AugmentConfigError, match=r"aug.yaml: key 'shift': with timestamps: true"):
        Augmenter.from_file(path, seed=0, timestamps=True)
    assert Augmenter.from_file(path, seed=0, timestamps=False)


# ---------------------------------------------------------------------------------------------------------
# Training data only


def test_only_training_data_is_augmented(tmp_path, processor):
    manifest = write_manifest(tmp_path / "data", count=3)
    aug = tmp_path / "aug.yaml"
    aug.write_text("gain: {p: 1, db: [-12, -6]}\nnoise: {p: 1, snr_db: [5, 10]}\n")
    cfg = TrainConfig(train_data=str(manifest), test_data=str(manifest), augment_config_path=str(aug), seed=3)
    tokens = WhisperTokens(processor.tokenizer, True, "transcribe", False, 448)
    train = build_dataset(cfg, "train", processor.feature_extractor, tokens)
    test = build_dataset(cfg, "test", processor.feature_extractor, tokens)
    assert train.augment is not None and test.augment is None

    def plain_features(sample):
        return processor.feature_extractor(
            load_audio(sample.audio_path), sampling_rate=RATE, return_tensors="np"
        ).input_features[0]

    for i in range(3):
        clean = plain_features(test.items[i].sample)
        np.testing.assert_array_equal(test[i]["input_features"], clean)  # evaluation: untouched
        assert not np.allclose(train[i]["input_features"], clean, atol=1e-3)  # training: augmented
        np.testing.assert_array_equal(train[i]["input_features"], train[i]["input_features"])  # same epoch
        assert train[i]["segments"] == test[i]["segments"]  # transcripts are not touched
    epoch0 = train[0]["input_features"]
    train.set_epoch(1)
    assert not np.array_equal(train[0]["input_features"], epoch0)
    train.set_epoch(0)
    np.testing.assert_array_equal(train[0]["input_features"], epoch0)

    # the same draws as the augmenter called directly with (seed, epoch, index)
    direct = Augmenter.from_file(aug, seed=3)(load_audio(train.items[2].sample.audio_path), 2, 0)
    want = processor.feature_extractor(direct, sampling_rate=RATE, return_tensors="np").input_features[0]
    np.testing.assert_array_equal(train[2]["input_features"], want)

    # no augmentation without augment_config_path
    plain = build_dataset(TrainConfig(train_data=str(manifest)), "train", processor.feature_extractor, tokens)
    assert isinstance(plain, PreferenceDataset) and plain.augment is None
    np.testing.assert_array_equal(plain[0]["input_features"], plain_features(plain.items[0].sample))
