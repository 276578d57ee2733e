"""Make preference pairs from plain ASR data: the reference is chosen, the model's own mistake rejected.

    whisper-orpo make-pairs --model M --data asr.jsonl --out pairs.jsonl [--num_beams 5] \\
        [--num_rejected K] [--batch_size 8] [--language L] [--task transcribe] [--max_new_tokens N]

``--data`` is our manifest shape with a reference "text" (or "sentence") instead of chosen/rejected.
Every clip is decoded by the base model with beam search, keeping the whole n-best list
(``num_beams`` hypotheses, best first), from the same decoder prefix the trainer uses (English-only
models: no language or task token; multilingual: the record's "language", else ``--language``). The
references and hypotheses are compared after Whisper's text normalisation (``EnglishTextNormalizer`` for
English, ``BasicTextNormalizer`` otherwise, as in :mod:`orpo.eval.text`): "rejected" is the best-scoring
hypothesis that differs from the reference, a real hard negative; with ``--num_rejected K`` up to K
distinct wrong hypotheses are kept (written as a list when K > 1). Clips where every hypothesis equals
the reference are skipped, counted, and listed in ``OUT_STEM.skipped.jsonl`` (so are clips longer than
Whisper's 30 s window, which are not decoded).

Each output record is the input record with "chosen" (the reference), "rejected", the clip's "wer"
(word error rate of the best hypothesis; "cer" for languages written without spaces) and
"source_line" (the input line), audio paths rewritten relative to the output's folder. The output is a
manifest the trainer reads as it is.

Resumable: records are appended batch by batch; rerunning with the same ``--out`` skips the input lines
already in the output or in the skipped list, and drops a truncated last line left by a crash.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import WhisperForConditionalGeneration
from transformers.utils import logging as hf_logging

from orpo.config import MakePairsConfig
from orpo.data.audio import SAMPLE_RATE, load_audio
from orpo.data.manifest import read_asr_manifest
from orpo.data.schema import AsrSample
from orpo.data.tokens import WhisperTokens
from orpo.errors import ConfigError, ManifestError
from orpo.eval.nbest import Scorer, nbest_config, nbest_hypotheses
from orpo.model.load import load_processor

logger = logging.getLogger(__name__)

MAX_SECONDS = 30.0  # Whisper's window: longer clips are listed as skipped, not decoded
ALL_RIGHT = "every hypothesis equals the reference"
TOO_LONG = "longer than 30 s: Whisper hears only the first 30 s"

# decode(samples, prefix ids) -> for each sample, its hypotheses as text, best first
Decoder = Callable[[list[AsrSample], list[int]], list[list[str]]]


def skipped_path(out: Path) -> Path:
    """Where the clips without a wrong hypothesis are listed: pairs.jsonl -> pairs.skipped.jsonl."""
    return out.with_name(out.stem + ".skipped.jsonl")


# ---------------------------------------------------------------------------------------------------------
# Decoding


class NBestDecoder:
    """Beam-search n-best lists from a Whisper model, from a given decoder prefix (:mod:`orpo.eval.nbest`)."""

    def __init__(self, model, processor, num_beams: int, max_new_tokens: int | None = None):
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.generation_config = nbest_config(model, processor.tokenizer, num_beams)

    @torch.no_grad()
    def __call__(self, samples: list[AsrSample], prefix: list[int]) -> list[list[str]]:
        audio = [load_audio(s.audio_path) for s in samples]
        features = self.processor.feature_extractor(
            audio, sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features
        prompt = torch.tensor([prefix] * len(samples), dtype=torch.long)
        limit = self.model.config.max_target_positions
        max_length = min(len(prefix) + self.max_new_tokens, limit) if self.max_new_tokens else limit
        tokenizer = self.processor.tokenizer
        lists = nbest_hypotheses(self.model, features, prompt, tokenizer, self.generation_config, max_length)
        return [[text for text, _ in hypotheses] for hypotheses in lists]


# ---------------------------------------------------------------------------------------------------------
# Resumable output


def _read_jsonl_for_resume(path: Path) -> list[dict]:
    """Records of an output file from an earlier run; a truncated last line (a crash mid-write) is cut off."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, pos = [], 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        last = end == -1
        chunk = data[pos:] if last else data[pos:end]
        line = data.count(b"\n", 0, pos) + 1
        if chunk.strip():
            try:
                record = json.loads(chunk)
            except json.JSONDecodeError:
                if not last:
                    raise ManifestError(
                        f"{path}: line {line} is not valid JSON; it is not a file this tool wrote, or it was edited"
                    ) from None
                logger.warning("%s: dropping a truncated last line left by an interrupted run", path)
                with path.open("r+b") as f:
                    f.truncate(pos)
                break
            if not isinstance(record, dict) or not isinstance(record.get("source_line"), int):
                raise ManifestError(
                    f"{path}: line {line} has no 'source_line'; --out must be a file written by orpo.make_pairs"
                )
            records.append(record)
            if last:  # complete record without its newline: finish the line before appending
                with path.open("ab") as f:
                    f.write(b"\n")
        pos = len(data) if last else end + 1
    return records


def _audio_relative_to(audio_path: Path, folder: Path) -> str:
    """The audio path relative to the output's folder, or absolute when they share nothing but the root."""
    audio, folder = audio_path.resolve(), folder.resolve()
    try:
        common = Path(os.path.commonpath([audio, folder]))
    except ValueError:  # another drive on Windows
        return str(audio)
    if common == Path(common.anchor):
        return str(audio)
    return os.path.relpath(audio, folder)


@dataclass
class Summary:
    clips: int = 0  # input clips
    decoded: int = 0  # decoded in this run
    resumed: int = 0  # done by an earlier run
    pairs: int = 0  # records in the output
    skipped: int = 0  # clips where every hypothesis equals the reference
    too_long: int = 0  # clips longer than Whisper's 30 s window: not decoded
    mean_wer: float | None = None  # mean per-clip WER over all decoded clips (skipped ones count as 0)
    mean_cer: float | None = None

    def line(self) -> str:
        parts = [f"clips: {self.clips}", f"pairs written: {self.pairs}", f"skipped: {self.skipped}"]
        if self.too_long:
            parts.append(f"too long (> {MAX_SECONDS:.0f} s, not decoded): {self.too_long}")
        if self.mean_wer is not None:
            parts.append(f"mean WER: {self.mean_wer:.2%}")
        if self.mean_cer is not None:
            parts.append(f"mean CER: {self.mean_cer:.2%}")
        parts.append(f"decoded now: {self.decoded}, resumed: {self.resumed}")
        return ", ".join(parts)


def _batches(samples: list[AsrSample], languages: list[str | None], batch_size: int):
    """Consecutive clips of the same language, at most batch_size at a time (one decoder prefix per batch)."""
    batch, batch_language = [], None
    for sample, language in zip(samples, languages):
        if batch and (len(batch) == batch_size or language != batch_language):
            yield batch, batch_language
            batch = []
        batch_language = language
        batch.append(sample)
    if batch:
        yield batch, batch_language


def _clip_languages(samples: list[AsrSample], tokens: WhisperTokens, default_language: str | None) -> list:
    """Each clip's language for its prefix and normaliser (None for English-only models: English)."""
    languages = []
    for sample in samples:
        language = sample.language or default_language
        if tokens.multilingual and language is None:
            raise ManifestError(
                f"{sample.source}: field 'language' is missing: a multilingual model needs the "
                "language of each clip (in the record, or --language)"
            )
        languages.append(language if tokens.multilingual else None)
    return languages


def _lines_done(samples: list[AsrSample], out: Path, skipped_file: Path) -> set[int]:
    """Input lines an earlier run already wrote (as a pair or as skipped); their records must match the input."""
    by_line = {s.line: s for s in samples}
    done = set()
    for path in (out, skipped_file):
        for record in _read_jsonl_for_resume(path):
            sample = by_line.get(record["source_line"])
            stored = record.get("audio", {}).get("path") if isinstance(record.get("audio"), dict) else None
            if sample is None or stored is None or (out.parent / stored).resolve() != sample.audio_path.resolve():
                raise ManifestError(
                    f"{path}: its record for input line {record['source_line']} does not match the input "
                    f"({sample.source if sample else 'no such line'}); it was made from other data: use another "
                    "--out or delete it"
                )
            done.add(record["source_line"])
    return done


def _output_record(
    sample: AsrSample,
    nbest: list[str],
    language,
    tokens: WhisperTokens,
    scorer: Scorer,
    num_rejected: int,
    folder: Path,
) -> tuple[dict, bool]:
    """(record, is a pair): the input record with chosen/rejected, or with the reason it is skipped."""
    kind, rate = scorer.error_rate(sample.text, nbest[0] if nbest else "", language)
    wrong = scorer.wrong_hypotheses(sample.text, nbest, language, num_rejected)
    audio = dict(sample.record["audio"]) if isinstance(sample.record.get("audio"), dict) else {}
    audio["path"] = _audio_relative_to(sample.audio_path, folder)
    dropped = ("text", "sentence", "chosen", "rejected", "audio", "wer", "cer", "source_line")
    record = {"audio": audio, **{k: v for k, v in sample.record.items() if k not in dropped}}
    if tokens.multilingual and language is not None and "language" not in record:
        record["language"] = language
    if wrong:
        record.update(chosen=sample.text, rejected=wrong if num_rejected > 1 else wrong[0])
    else:
        record.update(text=sample.text, best=nbest[0] if nbest else "", reason=ALL_RIGHT)
    record.update({kind: rate, "source_line": sample.line})
    return record, bool(wrong)


def make_pairs(
    samples: list[AsrSample],
    out: Path,
    decode: Decoder,
    tokens: WhisperTokens,
    default_language: str | None = None,
    num_rejected: int = 1,
    batch_size: int = 8,
    scorer: Scorer | None = None,
    progress: bool = True,
) -> Summary:
    """Decode the clips not yet in ``out`` and append their pairs; return the summary of the whole output."""
    if num_rejected < 1:
        raise ValueError(f"num_rejected must be >= 1, got {num_rejected}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scorer = scorer or Scorer()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped_file = skipped_path(out)

    languages = _clip_languages(samples, tokens, default_language)
    done = _lines_done(samples, out, skipped_file)
    todo = [(s, lang) for s, lang in zip(samples, languages) if s.line not in done]
    summary = Summary(clips=len(samples), resumed=len(done))
    if done:
        logger.info("resuming %s: %d of %d clips already done", out, len(done), len(samples))

    bar = tqdm(total=len(samples), initial=len(done), desc="make-pairs", unit="clip", disable=not progress)
    with out.open("a", encoding="utf-8") as pairs_f, skipped_file.open("a", encoding="utf-8") as skipped_f:
        # Whisper hears only the first 30 s: a longer clip's hypotheses cannot match its reference
        for sample, _ in [(s, lang) for s, lang in todo if s.duration > MAX_SECONDS]:
            record = {
                "audio": {"path": _audio_relative_to(sample.audio_path, out.parent)},
                "text": sample.text,
                "reason": TOO_LONG,
                "source_line": sample.line,
            }
            skipped_f.write(json.dumps(record, ensure_ascii=False) + "\n")
            bar.update(1)
        todo = [(s, lang) for s, lang in todo if s.duration <= MAX_SECONDS]
        for batch, language in _batches([s for s, _ in todo], [lang for _, lang in todo], batch_size):
            prefix = tokens.prefix(language)
            hypotheses = decode(batch, prefix)
            if len(hypotheses) != len(batch):
                raise RuntimeError(f"the decoder returned {len(hypotheses)} n-best lists for {len(batch)} clips")
            for sample, nbest in zip(batch, hypotheses):
                record, is_pair = _output_record(sample, nbest, language, tokens, scorer, num_rejected, out.parent)
                (pairs_f if is_pair else skipped_f).write(json.dumps(record, ensure_ascii=False) + "\n")
                summary.decoded += 1
            for f in (pairs_f, skipped_f):
                f.flush()
                os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()

    pairs, skipped = _read_jsonl_for_resume(out), _read_jsonl_for_resume(skipped_file)
    summary.pairs = len(pairs)
    summary.too_long = sum(r.get("reason") == TOO_LONG for r in skipped)
    summary.skipped = len(skipped) - summary.too_long
    for kind in ("wer", "cer"):
        rates = [r[kind] for r in pairs + skipped if kind in r]
        if rates:
            setattr(summary, f"mean_{kind}", sum(rates) / len(rates))
    return summary


def make_pairs_from_config(cfg: MakePairsConfig) -> None:
    """The command: check the manifest, load the model, make the pairs, print the summary."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    samples = read_asr_manifest(cfg.data, cfg.duration_tolerance)  # a bad line stops here, before the model loads
    hf_logging.set_verbosity_error()
    processor = load_processor(cfg.model)
    try:
        model = WhisperForConditionalGeneration.from_pretrained(cfg.model)
    except OSError as err:
        raise ConfigError(f"model: cannot load a Whisper model from {cfg.model!r} ({err})") from None
    model.to(torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    tokens = WhisperTokens.for_model(processor.tokenizer, model.config, cfg.task)
    decoder = NBestDecoder(model, processor, cfg.num_beams, cfg.max_new_tokens)
    summary = make_pairs(
        samples,
        Path(cfg.out),
        decoder,
        tokens,
        default_language=cfg.language,
        num_rejected=cfg.num_rejected,
        batch_size=cfg.batch_size,
    )
    print(summary.line())
    if summary.skipped:
        print(f"skipped clips are listed in {skipped_path(Path(cfg.out))}")
