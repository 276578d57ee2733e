"""A manifest (or several shards of one) checked once, tokenised, and kept as arrays in a cache.

Checking a manifest decodes every clip in full and tokenises every transcript (:mod:`orpo.data.manifest`,
:mod:`orpo.data.encode`): a bad line stops the run before training with its file, line and field. For a corpus
of millions of lines that is minutes of work, and one Python object per clip would cost gigabytes in every
process. So the result is kept as a :class:`ClipIndex`: a handful of flat numpy arrays (line numbers,
durations, languages, audio paths, transcript texts and token ids with their offsets), written to a cache
folder keyed by a hash of everything it depends on (the manifests' bytes and paths, the tokenizer, the prefix
settings, the duration tolerance), and read back memory-mapped: the pages are shared by every process on a
machine and read only as touched.

* **Cold** (no cache): the lines are checked in parallel, ``num_proc`` processes each taking a run of whole
  lines (one process below :data:`PARALLEL_LINES`, where starting workers costs more than it saves); the
  first bad line in file order is the error.
* **Warm**: the cache is read back after its audio files are found unchanged (size and modification time of
  each file, stat'ed in threads); a changed file means checking again.
* **Once per run**: the trainer's main process builds or loads it; the other processes load what it wrote
  (:func:`load_index` with ``build=False``).

The cache lives in ``index_cache_dir``, by default a ``.whisper-orpo-index`` folder beside the (first)
manifest, or ``~/.cache/whisper-orpo/index`` (``$XDG_CACHE_HOME``) where that folder cannot be written.
A folder in it is written under a temporary name and renamed into place, so a crash never leaves half a cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from orpo.data.encode import EncodedSample, encode_sample
from orpo.data.manifest import is_json_array, line_parts, read_manifest
from orpo.data.normalize import TextNormalizer
from orpo.data.schema import PreferenceSample
from orpo.data.tokens import WhisperTokens
from orpo.errors import ManifestError
from orpo.files import fresh_staging_dir, publish_dir

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
PARALLEL_LINES = 20_000  # fewer lines are checked in this process
CACHE_FOLDER = ".whisper-orpo-index"
ARRAYS = (
    "shard",  # int16: which manifest file
    "line",  # int32
    "duration",  # float32, decoded
    "language",  # int16 into languages, -1: none given
    "audio_offsets",  # int64 (clips + 1) into audio_bytes
    "audio_bytes",  # uint8: the resolved audio paths, UTF-8, one after the other
    "first_transcript",  # int64 (clips + 1): transcripts of clip i are first_transcript[i]:first_transcript[i + 1]
    "prefix",  # int8 per transcript: prefix tokens in its sequence
    "text_offsets",  # int64 (transcripts + 1) into text_bytes
    "text_bytes",  # uint8
    "token_offsets",  # int64 (transcripts + 1) into tokens
    "tokens",  # int32: each transcript's whole sequence, prefix and <|endoftext|> included
)


def manifest_files(spec: str) -> list[Path]:
    """The manifest shards a ``train_data``/``test_data`` value names: one file, a comma-separated list, or a glob
    (``data/train-*.jsonl``, sorted)."""
    files = []
    for part in (p.strip() for p in spec.split(",")):
        if any(c in part for c in "*?["):
            matched = sorted(glob.glob(os.path.expanduser(part)))
            if not matched:
                raise ManifestError(f"{part}: no manifest matches this pattern")
            files += [Path(m) for m in matched]
        elif part:
            files.append(Path(part).expanduser())
    for path in files:
        if not path.is_file():
            raise ManifestError(f"manifest {path} does not exist")
    return files


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the tokenizer's whole definition: other token ids mean another index."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(definition.encode()).hexdigest()


def index_key(files: list[Path], tokens: WhisperTokens, default_language: str | None, tolerance: float) -> str:
    """The cache key: everything the index's content depends on."""
    material = {
        "version": INDEX_VERSION,
        "files": [[str(path.resolve()), _sha256_file(path)] for path in files],
        "tokenizer": tokenizer_fingerprint(tokens.tokenizer),
        "tokens": [tokens.multilingual, tokens.task, tokens.timestamps, tokens.max_length],
        "language": default_language,
        "duration_tolerance": tolerance,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


@dataclass
class ClipIndex:
    """A checked, tokenised manifest as arrays (see :data:`ARRAYS`)."""

    files: list[str]
    languages: list[str]
    arrays: dict[str, np.ndarray]
    folder: Path | None = None  # the cache folder it was read from

    def __reduce__(self):
        """A cached index travels to another process (a spawned data-loader worker) as its folder, and is mapped
        there again: pickling the arrays would copy every one of them."""
        if self.folder is not None:
            return ClipIndex.load, (self.folder,)
        return super().__reduce__()

    def __len__(self) -> int:
        return len(self.arrays["line"])

    def _bytes(self, name: str, offsets: str, i: int) -> str:
        start, end = self.arrays[offsets][i], self.arrays[offsets][i + 1]
        return bytes(self.arrays[name][start:end]).decode("utf-8")

    def source(self, i: int) -> str:
        return f"{self.files[self.arrays['shard'][i]]}:{self.arrays['line'][i]}"

    def sample(self, i: int) -> PreferenceSample:
        """Clip ``i`` as a sample (its transcripts as plain text)."""
        first, end = self.arrays["first_transcript"][i], self.arrays["first_transcript"][i + 1]
        texts = [self._bytes("text_bytes", "text_offsets", k) for k in range(first, end)]
        language = int(self.arrays["language"][i])
        return PreferenceSample(
            audio_path=Path(self._bytes("audio_bytes", "audio_offsets", i)),
            duration=float(self.arrays["duration"][i]),
            chosen=texts[0],
            rejected=texts[1:],
            language=self.languages[language] if language >= 0 else None,
            source=self.source(i),
        )

    def encoded(self, i: int, default_language: str | None, multilingual: bool) -> EncodedSample:
        """Clip ``i`` with its token sequences, as :func:`orpo.data.encode.encode_sample` made them."""
        sample = self.sample(i)
        first, end = self.arrays["first_transcript"][i], self.arrays["first_transcript"][i + 1]
        offsets, tokens = self.arrays["token_offsets"], self.arrays["tokens"]
        segments = [
            (tokens[offsets[k] : offsets[k + 1]].tolist(), int(self.arrays["prefix"][k])) for k in range(first, end)
        ]
        return EncodedSample(sample, segments, sample.language or (default_language if multilingual else None))

    def packed_lengths(self) -> np.ndarray:
        """Decoder row length of each clip: its transcripts' sequences packed side by side (each less one)."""
        per_transcript = np.diff(self.arrays["token_offsets"]) - 1
        first = self.arrays["first_transcript"]
        return np.add.reduceat(per_transcript, first[:-1]) if len(first) > 1 else np.zeros(0, dtype=np.int64)

    def audio_files(self) -> list[str]:
        """The distinct audio files of the index."""
        offsets, blob = self.arrays["audio_offsets"], self.arrays["audio_bytes"]
        return sorted({bytes(blob[offsets[i] : offsets[i + 1]]).decode("utf-8") for i in range(len(self))})

    def save(self, folder: Path, key: str) -> None:
        """Into ``folder`` (staged under this process's own name, then renamed into place), with the audio files'
        sizes and times. Another process that published this very index meanwhile (several machines checking
        at once) is left alone."""
        staging = fresh_staging_dir(folder.with_name(f".tmp-{folder.name}-{os.getpid()}"))
        for name in ARRAYS:
            np.save(staging / f"{name}.npy", self.arrays[name], allow_pickle=False)
        meta = {"key": key, "files": self.files, "languages": self.languages, "audio": audio_stats(self.audio_files())}
        (staging / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
        if cached_key(folder) == key:
            shutil.rmtree(staging, ignore_errors=True)
            return
        publish_dir(staging, folder, aside=folder.with_name(f".old-{folder.name}-{os.getpid()}"))

    @classmethod
    def load(cls, folder: Path) -> "ClipIndex":
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in ARRAYS}
        return cls(meta["files"], meta["languages"], arrays, Path(folder))


def cached_key(folder: Path) -> str | None:
    """The key of the index cached in ``folder`` (None: none there, or one being replaced)."""
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError):
        return None


def audio_stats(paths: list[str]) -> dict[str, list[int] | None]:
    """(size, modification time in ns) of each file, stat'ed in threads (None: gone)."""

    def one(path):
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return [stat.st_size, stat.st_mtime_ns]

    with ThreadPoolExecutor(min(32, max(1, len(paths)))) as pool:
        return dict(zip(paths, pool.map(one, paths)))


def _columns(encoded: list[EncodedSample], shard: int) -> dict[str, np.ndarray | list]:
    """The arrays of one run of encoded clips (offsets from 0; :func:`_join` shifts them)."""
    languages = sorted({e.sample.language for e in encoded if e.sample.language})
    code = {language: k for k, language in enumerate(languages)}
    audio = [str(e.sample.audio_path).encode("utf-8") for e in encoded]
    texts = [t.encode("utf-8") for e in encoded for t in [e.sample.chosen, *e.sample.rejected]]
    sequences = [ids for e in encoded for ids, _ in e.segments]

    def offsets(lengths) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)

    return {
        "shard": np.full(len(encoded), shard, dtype=np.int16),
        "line": np.array([int(e.sample.source.rsplit(":", 1)[1]) for e in encoded], dtype=np.int32),
        "duration": np.array([e.sample.duration for e in encoded], dtype=np.float32),
        "language": np.array([code.get(e.sample.language, -1) for e in encoded], dtype=np.int16),
        "languages": languages,
        "audio_offsets": offsets([len(a) for a in audio]),
        "audio_bytes": np.frombuffer(b"".join(audio), dtype=np.uint8),
        "first_transcript": offsets([len(e.segments) for e in encoded]),
        "prefix": np.array([p for e in encoded for _, p in e.segments], dtype=np.int8),
        "text_offsets": offsets([len(t) for t in texts]),
        "text_bytes": np.frombuffer(b"".join(texts), dtype=np.uint8),
        "token_offsets": offsets([len(s) for s in sequences]),
        "tokens": np.array([i for s in sequences for i in s], dtype=np.int32),
    }


def _join(parts: list[dict]) -> tuple[list[str], dict[str, np.ndarray]]:
    """One set of arrays from the parts' (offsets shifted, language codes mapped to one list). Each array of the
    parts is let go as soon as it is joined, so the check holds the index about once, not twice."""
    languages = sorted({language for part in parts for language in part["languages"]})
    shifts = {"audio_offsets": "audio_bytes", "first_transcript": "prefix", "text_offsets": "text_bytes"}
    shifts["token_offsets"] = "tokens"
    sizes = [{name: len(part[name]) for name in ARRAYS} for part in parts]  # before any is let go
    arrays = {}
    for name in ARRAYS:
        values, base = [], 0
        for part, size in zip(parts, sizes):
            value = part.pop(name)
            if name in shifts:
                value = value[:-1] + base
                base += size[shifts[name]]
            elif name == "language":
                codes = [languages.index(language) for language in part["languages"]]
                value = np.array(codes + [-1], dtype=np.int16)[value]  # -1 indexes the appended -1
            values.append(value)
        if name in shifts:
            values.append(np.array([base], dtype=np.int64))
        arrays[name] = np.concatenate(values)
    return languages, arrays


def check_part(task: tuple) -> dict | ManifestError:
    """Check and encode one run of whole lines of one manifest (in a worker process): its arrays, or the first
    bad line's error."""
    path, shard, part, tolerance, tokens, default_language = task
    try:
        normalizer = TextNormalizer()
        samples = read_manifest(path, tolerance, part)
        return _columns([encode_sample(s, tokens, default_language, normalizer) for s in samples], shard)
    except ManifestError as err:
        return err


def build_index(
    files: list[Path], tokens: WhisperTokens, default_language: str | None, tolerance: float, num_proc: int
) -> ClipIndex:
    """Check every line of ``files`` (``num_proc`` processes for large JSON Lines files) into a ClipIndex."""
    tasks = []
    for shard, path in enumerate(files):
        parallel = num_proc > 1 and not is_json_array(path) and path.stat().st_size > 0
        parts = line_parts(path, 4 * num_proc) if parallel else [None]
        if parallel and _lines(parts) < PARALLEL_LINES:
            parts = [None]
        tasks += [(path, shard, part, tolerance, tokens, default_language) for part in parts]
    if len(tasks) > 1:
        with ProcessPoolExecutor(num_proc, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(check_part, tasks))
    else:
        results = [check_part(task) for task in tasks]
    for result in results:  # in file and line order: the first bad line is the error
        if isinstance(result, ManifestError):
            raise result
    if not any(len(part["line"]) for part in results):
        raise ManifestError(f"{files[0]}: the manifest has no records")
    languages, arrays = _join(results)
    return ClipIndex([str(path) for path in files], languages, arrays)


def _lines(parts: list[tuple[int, int, int]]) -> int:
    return parts[-1][2] - 1 if parts else 0


def cache_root(files: list[Path], index_cache_dir: str | None) -> Path:
    """Where index folders go: ``index_cache_dir``, else beside the first manifest when that can be written,
    else the user's cache folder."""
    if index_cache_dir:
        return Path(index_cache_dir).expanduser()
    beside = files[0].resolve().parent / CACHE_FOLDER
    if os.access(beside if beside.is_dir() else beside.parent, os.W_OK):
        return beside
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper-orpo" / "index"


def load_index(
    spec: str,
    tokens: WhisperTokens,
    default_language: str | None,
    tolerance: float,
    index_cache_dir: str | None = None,
    num_proc: int = 1,
    build: bool = True,
) -> ClipIndex:
    """The index of the manifest(s) ``spec`` names: from the cache when it holds it and its audio files are
    unchanged, else checked now (``build``) and cached. ``build=False``: another process has just built it
    (a cache that is not shared between machines is built again, with a warning)."""
    files = manifest_files(spec)
    started = time.monotonic()
    key = index_key(files, tokens, default_language, tolerance)
    folder = cache_root(files, index_cache_dir) / f"{files[0].stem}-{key[:20]}"
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        stats = audio_stats(list(meta["audio"]))
        if meta.get("key") == key and stats == meta["audio"]:
            index = ClipIndex.load(folder)
            logger.info("%s: %d clips from the index cache %s (%.1f s)", spec, len(index), folder, _since(started))
            return index
        logger.info("%s: audio files changed since %s was written; checking again", spec, folder)
    elif not build:
        logger.warning("%s: the index another process built is not in %s here; checking again", spec, folder)
    logger.info("%s: checking every line (%d processes), then caching the result in %s", spec, num_proc, folder)
    index = build_index(files, tokens, default_language, tolerance, num_proc)
    try:
        index.save(folder, key)
    except OSError as err:
        logger.warning("%s: the checked index could not be cached in %s (%s)", spec, folder, err)
    logger.info("%s: %d clips checked in %.1f s", spec, len(index), _since(started))
    if cached_key(folder) != key:  # not cached (a read-only disk), or being replaced by another check
        return index
    try:
        return ClipIndex.load(folder)
    except OSError:
        return index


def _since(started: float) -> float:
    return time.monotonic() - started
