"""On-the-fly audio augmentation of the training data, configured by a JSON or YAML file.

``augment_config_path`` names a mapping from effect to its settings; each effect has a probability
``p`` and a range ``[low, high]`` that its strength is drawn from, uniformly, for every clip::

    noise:             # white noise at a signal-to-noise ratio (audiomentations AddGaussianSNR)
      p: 0.5
      snr_db: [10, 40]
    background_noise:  # noise files from a folder, looped or cut to the clip (AddBackgroundNoise)
      p: 0.3
      folder: noises/  # relative to this file
      snr_db: [5, 30]
    speed:             # speed perturbation: tempo and pitch together, 1.1 = 10% faster (soxr resampling)
      p: 0.5
      factor: [0.9, 1.1]
    pitch:             # pitch shift in semitones, duration unchanged (PitchShift)
      p: 0.3
      semitones: [-2, 2]
    gain:              # volume change in dB (Gain)
      p: 0.5
      db: [-6, 6]
    shift:             # time shift in seconds, > 0 delays the onset (Shift without rollover)
      p: 0.3
      seconds: [-0.1, 0.5]

Effects run in this order: speed, pitch, shift, gain, noise, background_noise. A positive shift pads
silence in front and keeps the whole clip (up to Whisper's 30 s window); a negative one cuts the start.
Speed never makes a clip longer than 30 s (the factor is raised as needed).

Augmentation is applied to training clips only, never to evaluation. It is reproducible: the random
draws for a clip depend only on (seed, epoch, clip index), not on the global random state, which is left
as it was (audiomentations draws from Python's ``random`` and NumPy's global generator: they are seeded
for the call and restored after it). With ``timestamps: true``, speed and shift are refused, since they
move the speech away from its timestamps.

An unknown effect or key, a probability outside [0, 1] or a bad range is an :class:`~orpo.errors.AugmentConfigError`
naming the file and the key.
"""

from __future__ import annotations

import difflib
import json
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import audiomentations as am
import numpy as np
import soxr
import yaml
from audiomentations.core.transforms_interface import BaseWaveformTransform
from audiomentations.core.utils import find_audio_files_in_paths

from orpo.data.audio import SAMPLE_RATE
from orpo.errors import AugmentConfigError

MAX_SECONDS = 30.0


@dataclass(frozen=True)
class _Param:
    low_limit: float | None = None  # values must be >= this (None: no limit)
    high_limit: float | None = None  # values must be <= this
    strict_low: bool = False  # values must be > low_limit


# effect -> (range key, its limits, what it means); every effect also takes "p".
EFFECTS: dict[str, tuple[str, _Param, str]] = {
    "speed": ("factor", _Param(0.0, 4.0, strict_low=True), "speed factor (1.0 unchanged)"),
    "pitch": ("semitones", _Param(-24.0, 24.0), "pitch shift in semitones"),
    "shift": ("seconds", _Param(-MAX_SECONDS, MAX_SECONDS, strict_low=True), "time shift in seconds"),
    "gain": ("db", _Param(-60.0, 60.0), "gain in dB"),
    "noise": ("snr_db", _Param(-20.0, 100.0), "signal-to-noise ratio in dB"),
    "background_noise": ("snr_db", _Param(-20.0, 100.0), "signal-to-noise ratio in dB"),
}
EXTRA_KEYS = {"background_noise": ("folder",)}
ORDER = ("speed", "pitch", "shift", "gain", "noise", "background_noise")


def _closest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def read_augment_config(path: str | Path) -> dict[str, dict]:
    """Parse and check an augmentation file: ``{effect: {"p": float, range key: (low, high), ...}}``."""
    path = Path(path)
    if not path.is_file():
        raise AugmentConfigError(f"augment_config_path: file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise AugmentConfigError(
            f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {err}"
        ) from None
    if not isinstance(data, dict) or not data:
        raise AugmentConfigError(
            f"{path}: expected a mapping of effect: settings (effects: {', '.join(ORDER)}), got {data!r}"
        )
    return {effect: _read_effect(path, effect, settings) for effect, settings in data.items()}


def _read_effect(path: Path, effect, settings) -> dict:
    """One effect's checked settings: ``{"p": float, "range": (low, high)}`` (and its noise folder)."""
    if effect not in EFFECTS:
        raise AugmentConfigError(
            f"{path}: unknown augmentation '{effect}'; known: {', '.join(ORDER)}.{_closest(str(effect), EFFECTS)}"
        )
    range_key, limits, meaning = EFFECTS[effect]
    allowed = ("p", range_key) + EXTRA_KEYS.get(effect, ())
    if not isinstance(settings, dict):
        raise AugmentConfigError(
            f"{path}: key '{effect}' must be a mapping with {', '.join(allowed)}, got {settings!r}"
        )
    for key in settings:
        if key not in allowed:
            raise AugmentConfigError(
                f"{path}: key '{effect}.{key}' is unknown; '{effect}' takes "
                f"{', '.join(allowed)}.{_closest(str(key), allowed)}"
            )
    for key in allowed:
        if key not in settings:
            raise AugmentConfigError(f"{path}: key '{effect}.{key}' is missing")
    p = settings["p"]
    if not _number(p) or not 0.0 <= p <= 1.0:
        raise AugmentConfigError(f"{path}: key '{effect}.p' must be a probability in [0, 1], got {p!r}")
    entry = {"p": float(p), "range": _read_range(path, f"{effect}.{range_key}", settings[range_key], limits, meaning)}
    if effect == "background_noise":
        entry["folder"] = _noise_folder(path, settings["folder"])
    return entry


def _read_range(path: Path, key: str, value, limits: _Param, meaning: str) -> tuple[float, float]:
    """A ``[low, high]`` range (or one number) within the effect's limits."""
    given = value
    if _number(value):
        value = [value, value]
    if not (isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)):
        raise AugmentConfigError(f"{path}: key '{key}' must be a range [low, high] ({meaning}), got {given!r}")
    low, high = float(value[0]), float(value[1])
    if low > high:
        raise AugmentConfigError(f"{path}: key '{key}': low {low} is above high {high}")
    too_low = (low <= limits.low_limit) if limits.strict_low else (low < limits.low_limit)
    if too_low or high > limits.high_limit:
        bound = "(" if limits.strict_low else "["
        raise AugmentConfigError(
            f"{path}: key '{key}': [{low}, {high}] is outside "
            f"{bound}{limits.low_limit}, {limits.high_limit}] ({meaning})"
        )
    return low, high


def _noise_folder(config_path: Path, value) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise AugmentConfigError(f"{config_path}: key 'background_noise.folder' must be a folder path, got {value!r}")
    folder = Path(value) if Path(value).is_absolute() else config_path.parent / value
    if not folder.is_dir():
        raise AugmentConfigError(f"{config_path}: key 'background_noise.folder': folder {folder} does not exist")
    if not find_audio_files_in_paths(folder):
        raise AugmentConfigError(f"{config_path}: key 'background_noise.folder': no audio files in {folder}")
    return folder


class SpeedPerturbation(BaseWaveformTransform):
    """Speed perturbation: resample (soxr) and play at the original rate; tempo and pitch change together.

    A factor above 1 is faster (shorter); the factor is raised where needed so the result stays within
    Whisper's 30 s window.
    """

    supports_multichannel = False

    def __init__(self, min_factor: float, max_factor: float, p: float = 0.5):
        super().__init__(p)
        self.min_factor, self.max_factor = min_factor, max_factor

    def randomize_parameters(self, samples, sample_rate):
        super().randomize_parameters(samples, sample_rate)
        if self.parameters["should_apply"]:
            factor = random.uniform(self.min_factor, self.max_factor)
            shortest = samples.shape[-1] / (MAX_SECONDS * sample_rate)
            self.parameters["factor"] = max(factor, shortest)

    def apply(self, samples, sample_rate):
        factor = self.parameters["factor"]
        return soxr.resample(samples, sample_rate * factor, sample_rate, quality="HQ").astype(np.float32)


class PaddedShift(am.Shift):
    """audiomentations Shift without rollover; a positive shift first pads silence at the end (up to 30 s in
    all) so that delaying the onset never cuts the end of the speech."""

    def __init__(self, min_shift: float, max_shift: float, p: float = 0.5):
        super().__init__(
            min_shift=min_shift, max_shift=max_shift, shift_unit="seconds", rollover=False, fade_duration=0.0, p=p
        )

    def apply(self, samples, sample_rate):
        amount = int(round(self.parameters["shift_amount"] * sample_rate))
        if amount > 0:
            room = max(int(MAX_SECONDS * sample_rate) - samples.shape[-1], 0)
            samples = np.concatenate([samples, np.zeros(min(amount, room), dtype=samples.dtype)])
        return super().apply(samples, sample_rate)


def build_transforms(config: dict[str, dict]) -> list[tuple[str, object]]:
    """(effect, audiomentations transform) in application order."""
    transforms = []
    for effect in ORDER:
        if effect not in config:
            continue
        p, (low, high) = config[effect]["p"], config[effect]["range"]
        if effect == "speed":
            transform = SpeedPerturbation(low, high, p)
        elif effect == "pitch":
            transform = am.PitchShift(min_semitones=low, max_semitones=high, p=p)
        elif effect == "shift":
            transform = PaddedShift(low, high, p)
        elif effect == "gain":
            transform = am.Gain(min_gain_db=low, max_gain_db=high, p=p)
        elif effect == "noise":
            transform = am.AddGaussianSNR(min_snr_db=low, max_snr_db=high, p=p)
        else:
            transform = am.AddBackgroundNoise(
                sounds_path=config[effect]["folder"], min_snr_db=low, max_snr_db=high, noise_rms="relative", p=p
            )
        transforms.append((effect, transform))
    return transforms


_RNG_LOCK = threading.Lock()


class Augmenter:
    """``augmenter(audio, index, epoch)``: the configured effects, drawn from (seed, epoch, index)."""

    def __init__(self, config: dict[str, dict], seed: int, sample_rate: int = SAMPLE_RATE):
        self.config = config
        self.seed = int(seed)
        self.sample_rate = sample_rate
        self.transforms = build_transforms(config)

    @classmethod
    def from_file(cls, path: str | Path, seed: int, timestamps: bool = False) -> "Augmenter":
        config = read_augment_config(path)
        moving = [effect for effect in ("speed", "shift") if effect in config]
        if timestamps and moving:
            raise AugmentConfigError(
                f"{path}: key '{moving[0]}': with timestamps: true, speed and shift would move the speech away "
                "from its timestamp tokens; remove them (noise, background_noise, pitch and gain are fine)"
            )
        return cls(config, seed)

    def _seeds(self, index: int, epoch: int) -> np.ndarray:
        return np.random.SeedSequence([self.seed & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(4)

    def __call__(self, audio: np.ndarray, index: int, epoch: int = 0) -> np.ndarray:
        state = self._seeds(index, epoch)
        audio = np.asarray(audio, dtype=np.float32)
        with _RNG_LOCK:
            py_state, np_state = random.getstate(), np.random.get_state()
            try:
                random.seed(int.from_bytes(state.tobytes(), "little"))
                np.random.seed(state)
                for _, transform in self.transforms:
                    audio = transform(audio, sample_rate=self.sample_rate)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return np.ascontiguousarray(audio, dtype=np.float32)
