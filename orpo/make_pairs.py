"""Make preference pairs from plain ASR data: the reference is chosen, the model's own mistake rejected.

    python -m orpo.make_pairs --model M --data asr.jsonl --out pairs.jsonl [--num_beams 5] \\
        [--num-rejected K] [--batch_size 8] [--language L] [--task transcribe] [--max_new_tokens N]

``--data`` is our manifest shape with a reference "text" (or "sentence") instead of chosen/rejected.
Every clip is decoded by the base model with beam search, keeping the whole n-best list
(``num_beams`` hypotheses, best first), from the same decoder prefix the trainer uses (English-only
models: no language or task token; multilingual: the record's "language", else ``--language``). The
references and hypotheses are compared after Whisper's text normalisation (``EnglishTextNormalizer`` for
English, ``BasicTextNormalizer`` otherwise, as in :mod:`orpo.evaluate`): "rejected" is the best-scoring
hypothesis that differs from the reference, a real hard negative; with ``--num-rejected K`` up to K
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

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from orpo.data import SAMPLE_RATE, AsrSample, ManifestError, WhisperTokens, language_code, load_audio, read_asr_manifest

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
    """Beam search n-best lists from a Whisper model, from a given decoder prefix.

    Whisper's own ``generate`` turns ``num_return_sequences`` into that many copies of each clip, so
    beam search returns the same best hypothesis N times; the plain ``GenerationMixin.generate`` with the
    prefix as ``decoder_input_ids`` returns the real n-best list, ordered by score.
    """

    def __init__(self, model, processor, num_beams: int, max_new_tokens: int | None = None, device=None):
        from transformers import GenerationConfig

        self.model = model.eval()
        self.processor = processor
        self.num_beams = num_beams
        self.device = device or next(model.parameters()).device
        self.max_new_tokens = max_new_tokens
        config = GenerationConfig.from_dict(model.generation_config.to_dict())
        for name in ("forced_decoder_ids", "language", "task", "return_timestamps"):
            if hasattr(config, name):
                setattr(config, name, None)
        # no timestamps after <|notimestamps|>: suppress every timestamp token
        tokenizer = processor.tokenizer
        first_timestamp = tokenizer.convert_tokens_to_ids("<|0.00|>")
        vocab = model.config.vocab_size
        suppress = list(config.suppress_tokens or [])
        if isinstance(first_timestamp, int) and first_timestamp < vocab:
            suppress += list(range(first_timestamp, vocab))
        config.suppress_tokens = sorted(set(suppress))
        config.num_beams = num_beams
        config.num_return_sequences = num_beams
        config.do_sample = False
        config.return_dict_in_generate = True
        config.output_scores = True
        self.generation_config = config

    @torch.no_grad()
    def __call__(self, samples: list[AsrSample], prefix: list[int]) -> list[list[str]]:
        from transformers.generation import GenerationMixin

        audio = [load_audio(s.audio_path) for s in samples]
        features = self.processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        features = features.to(self.device, dtype=next(self.model.parameters()).dtype)
        prompt = torch.tensor([prefix] * len(samples), dtype=torch.long, device=self.device)
        max_new = self.max_new_tokens or (self.model.config.max_target_positions - len(prefix))
        config = self.generation_config
        config.max_new_tokens = max_new
        config.max_length = None
        out = GenerationMixin.generate(self.model, input_features=features, decoder_input_ids=prompt,
                                       generation_config=config)
        texts = self.processor.tokenizer.batch_decode(out.sequences[:, len(prefix):], skip_special_tokens=True)
        scores = out.sequences_scores.tolist()
        n = self.num_beams
        results = []
        for i in range(len(samples)):
            group = sorted(zip(scores[i * n:(i + 1) * n], range(n), texts[i * n:(i + 1) * n]),
                           key=lambda t: (-t[0], t[1]))
            results.append([text.strip() for _, _, text in group])
        return results


# ---------------------------------------------------------------------------------------------------------
# Scoring and choosing the rejected hypotheses


class Scorer:
    """Normalise as Whisper does and measure error rates (WER, or CER for unspaced languages).

    After Whisper's normaliser (that of :mod:`orpo.evaluate`), words without a letter or digit are
    dropped: ``EnglishTextNormalizer`` turns a trailing "..." into a stray "." word, which is not a
    transcription mistake and must not make a hypothesis "wrong".
    """

    def __init__(self):
        from orpo.evaluate import TextNormalizer, uses_cer

        self._normalize = TextNormalizer()
        self.uses_cer = uses_cer

    def normalize(self, text: str, language: str | None) -> str:
        normalized = self._normalize(text, language)
        if self.uses_cer(language):
            return normalized
        return " ".join(w for w in normalized.split() if any(c.isalnum() for c in w))

    def error_rate(self, reference: str, hypothesis: str, language: str | None) -> tuple[str, float]:
        import jiwer

        kind = "cer" if self.uses_cer(language) else "wer"
        ref, hyp = self.normalize(reference, language), self.normalize(hypothesis, language)
        if not ref:
            return kind, 0.0 if not hyp else 1.0
        return kind, float(jiwer.cer(ref, hyp) if kind == "cer" else jiwer.wer(ref, hyp))

    def wrong_hypotheses(self, reference: str, hypotheses: list[str], language: str | None, keep: int) -> list[str]:
        """Up to ``keep`` hypotheses (best first) that differ from the reference and from each other after
        normalisation; empty hypotheses never count."""
        ref = self.normalize(reference, language)
        seen, wrong = {ref}, []
        for hypothesis in hypotheses:
            norm = self.normalize(hypothesis, language)
            if not hypothesis.strip() or norm in seen:
                continue
            seen.add(norm)
            wrong.append(hypothesis.strip())
            if len(wrong) == keep:
                break
        return wrong


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
                    raise ManifestError(f"{path}: line {line} is not valid JSON; "
                                        "it is not a file this tool wrote, or it was edited") from None
                logger.warning("%s: dropping a truncated last line left by an interrupted run", path)
                with path.open("r+b") as f:
                    f.truncate(pos)
                break
            if not isinstance(record, dict) or not isinstance(record.get("source_line"), int):
                raise ManifestError(f"{path}: line {line} has no 'source_line'; "
                                    "--out must be a file written by orpo.make_pairs")
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
    clips: int = 0            # input clips
    decoded: int = 0          # decoded in this run
    resumed: int = 0          # done by an earlier run
    pairs: int = 0            # records in the output
    skipped: int = 0          # clips where every hypothesis equals the reference
    too_long: int = 0         # clips longer than Whisper's 30 s window: not decoded
    mean_wer: float | None = None   # mean per-clip WER over all decoded clips (skipped ones count as 0)
    mean_cer: float | None = None
    rates: dict = field(default_factory=dict, repr=False)

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


def make_pairs(samples: list[AsrSample], out: Path, decode: Decoder, tokens: WhisperTokens,
               default_language: str | None = None, num_rejected: int = 1, batch_size: int = 8,
               scorer: Scorer | None = None, progress: bool = True) -> Summary:
    """Decode the clips not yet in ``out`` and append their pairs; return the summary of the whole output."""
    if num_rejected < 1:
        raise ValueError(f"num_rejected must be >= 1, got {num_rejected}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scorer = scorer or Scorer()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped_file = skipped_path(out)

    languages = []
    for sample in samples:
        language = sample.language or default_language
        if tokens.multilingual and language is None:
            raise ManifestError(f"{sample.source}: field 'language' is missing: a multilingual model needs the "
                                "language of each clip (in the record, or --language)")
        languages.append(language if tokens.multilingual else None)  # English-only: English normaliser

    by_line = {s.line: s for s in samples}
    done_pairs, done_skipped = _read_jsonl_for_resume(out), _read_jsonl_for_resume(skipped_file)
    for path, records in ((out, done_pairs), (skipped_file, done_skipped)):
        for record in records:
            sample = by_line.get(record["source_line"])
            stored = record.get("audio", {}).get("path") if isinstance(record.get("audio"), dict) else None
            if sample is None or stored is None or \
                    (out.parent / stored).resolve() != sample.audio_path.resolve():
                raise ManifestError(
                    f"{path}: its record for input line {record['source_line']} does not match the input "
                    f"({sample.source if sample else 'no such line'}); it was made from other data: use another "
                    "--out or delete it"
                )
    done = {r["source_line"] for r in done_pairs} | {r["source_line"] for r in done_skipped}
    todo = [(s, lang) for s, lang in zip(samples, languages) if s.line not in done]
    summary = Summary(clips=len(samples), resumed=len(done))
    if done:
        logger.info("resuming %s: %d of %d clips already done", out, len(done), len(samples))

    bar = tqdm(total=len(samples), initial=len(done), desc="make-pairs", unit="clip", disable=not progress)
    with out.open("a", encoding="utf-8") as pairs_f, skipped_file.open("a", encoding="utf-8") as skipped_f:
        # Whisper hears only the first 30 s: a longer clip's hypotheses cannot match its reference
        for sample, _ in [(s, lang) for s, lang in todo if s.duration > MAX_SECONDS]:
            record = {"audio": {"path": _audio_relative_to(sample.audio_path, out.parent)}, "text": sample.text,
                      "reason": TOO_LONG, "source_line": sample.line}
            skipped_f.write(json.dumps(record, ensure_ascii=False) + "\n")
            bar.update(1)
        todo = [(s, lang) for s, lang in todo if s.duration <= MAX_SECONDS]
        for batch, language in _batches([s for s, _ in todo], [lang for _, lang in todo], batch_size):
            prefix = tokens.prefix(language)
            hypotheses = decode(batch, prefix)
            if len(hypotheses) != len(batch):
                raise RuntimeError(f"the decoder returned {len(hypotheses)} n-best lists for {len(batch)} clips")
            for sample, nbest in zip(batch, hypotheses):
                kind, rate = scorer.error_rate(sample.text, nbest[0] if nbest else "", language)
                wrong = scorer.wrong_hypotheses(sample.text, nbest, language, num_rejected)
                audio = dict(sample.record["audio"]) if isinstance(sample.record.get("audio"), dict) else {}
                audio["path"] = _audio_relative_to(sample.audio_path, out.parent)
                record = {k: v for k, v in sample.record.items()
                          if k not in ("text", "sentence", "chosen", "rejected", "audio", "wer", "cer", "source_line")}
                record = {"audio": audio, **record}
                if tokens.multilingual and language is not None and "language" not in record:
                    record["language"] = language
                if wrong:
                    record.update(chosen=sample.text, rejected=wrong if num_rejected > 1 else wrong[0])
                    record.update({kind: rate, "source_line": sample.line})
                    pairs_f.write(json.dumps(record, ensure_ascii=False) + "\n")
                else:
                    record.update(text=sample.text, best=nbest[0] if nbest else "", reason=ALL_RIGHT)
                    record.update({kind: rate, "source_line": sample.line})
                    skipped_f.write(json.dumps(record, ensure_ascii=False) + "\n")
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
            summary.rates[kind] = rates
            setattr(summary, f"mean_{kind}", sum(rates) / len(rates))
    return summary


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orpo.make_pairs",
        description="Make ORPO preference pairs from plain ASR data: chosen = the reference, rejected = the "
                    "base model's best-scoring wrong beam-search hypothesis.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Whisper model directory or hub id (the base model)")
    parser.add_argument("--data", required=True, help="ASR manifest with 'text' (or 'sentence') per clip")
    parser.add_argument("--out", required=True, help="output preference manifest (JSON Lines); rerun to resume")
    parser.add_argument("--num_beams", "--num-beams", type=int, default=5, help="beam size = n-best list length")
    parser.add_argument("--num_rejected", "--num-rejected", type=int, default=1,
                        help="keep up to K distinct wrong hypotheses per clip (a list when K > 1)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8, help="clips decoded at a time")
    parser.add_argument("--language", default=None,
                        help="language of clips without a 'language' field (multilingual models)")
    parser.add_argument("--task", default="transcribe", choices=("transcribe", "translate"))
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=None,
                        help="longest hypothesis in tokens (default: as long as the decoder allows)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        if args.num_rejected < 1:
            raise ValueError(f"--num-rejected must be >= 1, got {args.num_rejected}")
        if args.num_beams < args.num_rejected:
            raise ValueError(f"--num_beams ({args.num_beams}) must be at least --num-rejected ({args.num_rejected}): "
                             "the wrong hypotheses come from the n-best list")
        if args.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
        if args.language is not None:
            language_code(args.language)
        samples = read_asr_manifest(args.data)  # a bad line stops here, before the model loads
        from transformers import WhisperForConditionalGeneration, WhisperProcessor
        from transformers.utils import logging as hf_logging

        from orpo.pretrained import is_multilingual

        hf_logging.set_verbosity_error()
        processor = WhisperProcessor.from_pretrained(args.model)
        model = WhisperForConditionalGeneration.from_pretrained(args.model)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(device)
        tokens = WhisperTokens(processor.tokenizer, is_multilingual(model.config), args.task, False,
                               model.config.max_target_positions)
        decoder = NBestDecoder(model, processor, args.num_beams, args.max_new_tokens, device)
        summary = make_pairs(samples, Path(args.out), decoder, tokens, default_language=args.language,
                             num_rejected=args.num_rejected, batch_size=args.batch_size)
    except (ManifestError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.line())
    if summary.skipped:
        print(f"skipped clips are listed in {skipped_path(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
