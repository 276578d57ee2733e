"""The one audio decoder: files, bytes and arrays become 16 kHz mono float32, through soundfile and soxr.

soundfile reads WAV, FLAC, OGG and more without ffmpeg; soxr resamples at high quality. A source is a
path, a binary stream (dataset bytes) or an ``(array, sampling_rate)`` pair.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm.auto import tqdm

from orpo.errors import ManifestError

SAMPLE_RATE = 16_000
DECODE_BLOCK = 1 << 16  # frames per read while checking a file
DECODE_THREADS = min(16, os.cpu_count() or 1)

AudioSource = Path | io.BytesIO | tuple  # a file, stored bytes, or (array, sampling_rate)


def _readable(source):
    if isinstance(source, io.BytesIO):
        source.seek(0)
        return source
    return source if hasattr(source, "read") else str(source)


def audio_duration(source: AudioSource) -> float:
    """Seconds of audio in ``source``, decoded in full (arrays: from their length).

    Decoding every frame, not only the header, finds a file whose frames are corrupt before training starts
    rather than in the batch (or the final evaluation) that first reads it.
    """
    if isinstance(source, tuple):
        audio, rate = source
        return audio.shape[0] / rate
    try:
        with sf.SoundFile(_readable(source)) as f:
            frames = sum(len(block) for block in f.blocks(blocksize=DECODE_BLOCK, dtype="float32"))
            rate = f.samplerate
    except Exception as err:  # soundfile raises several types for undecodable files
        raise ManifestError(f"cannot decode {_describe(source)}: {err}") from None
    return frames / rate


def audio_durations(sources: list[AudioSource], desc: str = "decode audio") -> list[float | ManifestError]:
    """:func:`audio_duration` of every source, in threads (libsndfile releases the GIL); each entry is the
    duration or the error of that source, in the order given, so a caller reports the first bad one."""

    def one(source):
        try:
            return audio_duration(source)
        except ManifestError as err:
            return err

    threads = min(DECODE_THREADS, max(1, len(sources)))
    with ThreadPoolExecutor(threads) as pool:
        return list(
            tqdm(pool.map(one, sources), total=len(sources), desc=desc, leave=False, disable=len(sources) < 100)
        )


def load_audio(source: AudioSource) -> np.ndarray:
    """The whole of ``source`` (a path, a binary stream or an (array, rate) pair) as 16 kHz mono float32."""
    if isinstance(source, tuple):
        audio, rate = source
        return to_mono_16k(audio, rate)
    try:
        audio, rate = sf.read(_readable(source), dtype="float32", always_2d=True)
    except Exception as err:
        raise ManifestError(f"cannot decode {_describe(source)}: {err}") from None
    return to_mono_16k(audio, rate)


def _describe(source) -> str:
    return f"audio file {source}" if isinstance(source, (str, Path)) else "the audio"


def to_mono_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    """(frames,) or (frames, channels) audio at ``rate`` -> mono float32 at 16 kHz."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def load_sample_audio(sample) -> np.ndarray:
    """A sample's clip as 16 kHz mono float32, from its dataset row or its file."""
    if sample.audio_loader is not None:
        return sample.audio_loader()
    return load_audio(sample.audio_path)
