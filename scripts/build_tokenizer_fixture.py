#!/usr/bin/env python
"""Build the multilingual Whisper tokenizer fixture used by the unit tests.

The Hugging Face hub is not reachable, so the tokenizer is rebuilt from the
original OpenAI vocabulary: ``whisper/assets/multilingual.tiktoken`` from the
``openai-whisper`` sdist on PyPI. The result is the tokenizer of the
multilingual whisper-tiny/base/small/medium checkpoints (99 languages,
51865 ids) plus a default 80-mel ``WhisperFeatureExtractor``, saved so that
``WhisperProcessor.from_pretrained(OUT_DIR)`` works offline.

Usage:
    python scripts/build_tokenizer_fixture.py [OUT_DIR] [--tiktoken-file PATH]

OUT_DIR defaults to tests/fixtures/whisper_tokenizer. With --tiktoken-file a
local multilingual.tiktoken is used instead of downloading the sdist.
"""

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import tiktoken
from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.whisper.tokenization_whisper import LANGUAGES

WHISPER_SDIST = "openai-whisper==20250625"
TIKTOKEN_SHA256 = "b34b360dbb493e781e479794586d661700670d65564001f23024971d1f2fa126"
# Pre-tokenization regex of whisper (and GPT-2), from whisper/tokenizer.py.
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
NUM_LANGUAGES = 99  # whisper-tiny..medium; large-v3 has 100 (adds <|yue|>)
VOCAB_SIZE = 51865

# Same order as whisper.tokenizer.get_encoding: ids start right after the BPE ranks.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    *[f"<|{lang}|>" for lang in list(LANGUAGES)[:NUM_LANGUAGES]],
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",  # spelled <|nospeech|> by openai-whisper and in large-v3
    "<|notimestamps|>",
]
TIMESTAMP_TOKENS = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]

SAMPLE_TEXTS = [
    " Hello world",
    "Hello world!",
    "  leading spaces and trailing  ",
    "It's 3:45pm, isn't it? They'll say we'd've gone.",
    " 1234567890 3.14159 -42 1,000,000",
    "你好，世界！今天天气很好。",
    " Grüße aus Köln: Straße, Äpfel & Übermaß.",
    "Привет, как дела?",
    "こんにちは世界",
    "tabs\tand\nnewlines\n\n end",
    "emoji 🙂🎉 and symbols ©®™ €£¥",
]


def download_tiktoken_file(workdir: Path) -> Path:
    """Fetch the openai-whisper sdist with pip and extract multilingual.tiktoken."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            WHISPER_SDIST,
            "-d",
            str(workdir),
        ],
        check=True,
    )
    (sdist,) = workdir.glob("openai_whisper-*.tar.gz")
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/multilingual.tiktoken"))
        target = workdir / "multilingual.tiktoken"
        target.write_bytes(tar.extractfile(member).read())
    return target


def load_ranks(path: Path) -> dict[bytes, int]:
    """Parse a .tiktoken file (base64 token, rank per line) and check its checksum."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != TIKTOKEN_SHA256:
        raise ValueError(f"unexpected sha256 {digest} for {path}")
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}


def bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Merge the bytes of `token` with ranks below `max_rank` (as tiktoken would)."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]


def ranks_to_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Convert tiktoken ranks to a GPT-2 style byte-level vocab and ordered merge list."""
    byte_encoder = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[to_str(token)] = rank
        if len(token) > 1:
            pair = bpe_split(ranks, token, max_rank=rank)
            assert len(pair) == 2, (token, pair)
            merges.append((to_str(pair[0]), to_str(pair[1])))
    return vocab, merges


def build_tokenizer(ranks: dict[bytes, int]) -> WhisperTokenizerFast:
    """Create the HF tokenizer: BPE vocab, then specials (special) and timestamps (not special)."""
    vocab, merges = ranks_to_vocab_merges(ranks)
    tok = WhisperTokenizerFast(vocab=vocab, merges=merges, pad_token="<|endoftext|>")
    tok.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    tok.add_tokens(TIMESTAMP_TOKENS, special_tokens=False)  # like the hub checkpoints
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})  # -> tok.all_special_ids
    tok.set_prefix_tokens()  # rebuild the post-processor now that <|startoftranscript|> etc. exist
    return tok


def tiktoken_encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """The reference encoding, built exactly like whisper.tokenizer.get_encoding."""
    specials = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS + TIMESTAMP_TOKENS)}
    return tiktoken.Encoding(
        name="multilingual",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=specials,
        explicit_n_vocab=VOCAB_SIZE,
    )


def verify(out_dir: Path, ranks: dict[bytes, int]) -> None:
    """Reload the saved fixture and compare it with tiktoken."""
    tok = WhisperProcessor.from_pretrained(out_dir).tokenizer
    ref = tiktoken_encoding(ranks)
    assert len(tok) == VOCAB_SIZE, len(tok)
    for idx, token in enumerate(SPECIAL_TOKENS + TIMESTAMP_TOKENS, start=len(ranks)):
        assert tok.convert_tokens_to_ids(token) == idx == ref.encode_single_token(token), token
    for text in SAMPLE_TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == ref.encode(text), (text, ids, ref.encode(text))
        assert tok.decode(ids) == text, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="tests/fixtures/whisper_tokenizer")
    parser.add_argument("--tiktoken-file", type=Path, help="local multilingual.tiktoken (skips the download)")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.tiktoken_file or download_tiktoken_file(Path(tmp))
        ranks = load_ranks(path)

    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(), tokenizer=build_tokenizer(ranks))
    out_dir.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out_dir)
    # tokenizer.json already holds vocab and merges; drop the redundant copies
    # and store it compactly (pretty-printed it is twice as large).
    for name in ("vocab.json", "merges.txt"):
        (out_dir / name).unlink(missing_ok=True)
    tok_json = out_dir / "tokenizer.json"
    compact = json.dumps(json.loads(tok_json.read_text(encoding="utf-8")), ensure_ascii=False, separators=(",", ":"))
    tok_json.write_text(compact, encoding="utf-8")

    verify(out_dir, ranks)
    print(f"wrote {out_dir}:", *sorted(f"{p.name} ({p.stat().st_size} B)" for p in out_dir.iterdir()), sep="\n  ")


if __name__ == "__main__":
    main()
