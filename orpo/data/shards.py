"""``whisper-orpo make-shards``: a manifest written as WebDataset tar shards, for ``streaming: true``.

WebDataset is the sharded format here because it is plain tar: any tool lists, writes or repairs it, it streams
from local disk, HTTP or object storage, and ``datasets`` reads it (with a resumable position) without another
dependency. Each sample is two members with one key: ``KEY.<audio extension>`` (the clip's file, bytes as they
are) and ``KEY.json`` (the record's fields: ``chosen``, ``rejected``, ``language``, ``duration``, ``source``; timed
segments as ``chosens``/``rejecteds``). The manifest is checked in full first (as for training); every shard is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import asdict
from pathlib import Path

from orpo.data.manifest import read_manifest
from orpo.errors import ConfigError

logger = logging.getLogger(__name__)


def sample_record(sample) -> dict:
    """The JSON member of one sample."""
    record = {"chosen": sample.chosen, "rejected": sample.rejected, "duration": sample.duration}
    record |= {"language": sample.language} if sample.language else {}
    if sample.chosen_segments:
        record["chosens"] = [asdict(s) for s in sample.chosen_segments]
    if sample.rejected_segments:
        record["rejecteds"] = [[asdict(s) for s in segs] if segs else None for segs in sample.rejected_segments]
    return record | {"source": sample.source}


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_shards(manifest: str, out: str, samples_per_shard: int = 1000, overwrite: bool = False) -> list[Path]:
    """The manifest's samples in ``out/STEM-000000.tar``, ...; the shard paths."""
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise ConfigError(f"{folder} is not empty: choose another --out, or give --overwrite true", key="out")
    samples = read_manifest(manifest)
    folder.mkdir(parents=True, exist_ok=True)
    stem, shards = Path(manifest).stem, []
    for first in range(0, len(samples), samples_per_shard):
        path = folder / f"{stem}-{len(shards):06d}.tar"
        staging = path.with_name(f".{path.name}.tmp")
        with tarfile.open(staging, "w") as tar:
            for index, sample in enumerate(samples[first : first + samples_per_shard], start=first):
                key = f"{index:09d}"
                extension = sample.audio_path.suffix.lstrip(".").lower() or "wav"
                add_member(tar, f"{key}.{extension}", sample.audio_path.read_bytes())
                add_member(tar, f"{key}.json", json.dumps(sample_record(sample), ensure_ascii=False).encode("utf-8"))
        staging.replace(path)
        shards.append(path)
    logger.info("%s: %d samples in %d shards in %s", manifest, len(samples), len(shards), folder)
    return shards
