"""Generation-based evaluation: WER (or CER), base-versus-tuned reports, and ``python -m orpo.evaluate``.

Transcripts are generated from the same decoder prefix the model is trained on
(``<|startoftranscript|><|lang|><|task|><|notimestamps|>``, or ``<|startoftranscript|><|notimestamps|>``
for English-only models), greedy by default or with beam search, in batches, each process on its
shard of the test set. References and hypotheses are normalised as Whisper's authors do: English with
``EnglishTextNormalizer`` (British-to-American spellings included), other languages with
``BasicTextNormalizer``. Languages written without spaces between words (Chinese, Japanese, Thai, ...)
are scored by character error rate (whitespace removed); all others by word error rate. Both are
corpus-level: total edits over total reference words (characters).

The British-to-American spelling table (``orpo/english_spelling.json``) is OpenAI Whisper's
``whisper/normalizers/english.json`` (MIT licence), the file hub checkpoints ship as ``normalizer.json``.
A tokenizer loaded from a directory without ``normalizer.json`` (a converted model, a local copy) has
no table, so it is bundled here; a tokenizer that has one uses its own.

Command line::

    python -m orpo.evaluate --model DIR --data test.jsonl [--language L] [--num_beams N] [--batch_size B] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from orpo.data import PreferenceDataset, language_code
from orpo.distributed import generation_kwargs

logger = logging.getLogger(__name__)

ENGLISH_SPELLING_FILE = Path(__file__).with_name("english_spelling.json")

# Whisper language codes of languages written without spaces between words: scored by CER.
# (Chinese, Japanese, Korean as the brief of this project asks, Thai, Lao, Burmese, Khmer, Cantonese,
# Tibetan.)
CER_LANGUAGES = frozenset({"zh", "ja", "ko", "th", "lo", "my", "km", "yue", "bo"})

# Rows of the comparison table: (metric key without the "eval/" prefix, label, shown as a percentage).
REPORT_ROWS = [
    ("wer", "WER", True),
    ("cer", "CER", True),
    ("loss", "eval/loss", False),
    ("rewards/accuracies", "rewards/accuracies", False),
    ("rewards/margins", "rewards/margins", False),
]


# ---------------------------------------------------------------------------------------------------------
# Text normalisation and error rates


@lru_cache(maxsize=1)
def english_spelling_mapping() -> dict[str, str]:
    """Whisper's British-to-American spelling table (bundled copy of ``normalizer.json``)."""
    return json.loads(ENGLISH_SPELLING_FILE.read_text(encoding="utf-8"))


def uses_cer(language: str | None) -> bool:
    """True for languages written without spaces between words (scored by character error rate)."""
    return language is not None and language_code(language) in CER_LANGUAGES


class TextNormalizer:
    """Whisper's normalisers by language: English for 'en' (and no language), basic for the rest."""

    def __init__(self, english_spelling: dict[str, str] | None = None):
        from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

        self.english = EnglishTextNormalizer(english_spelling or english_spelling_mapping())
        self.basic = BasicTextNormalizer()

    def __call__(self, text: str, language: str | None) -> str:
        code = language_code(language) if language else "en"
        normalized = self.english(text) if code == "en" else self.basic(text)
        if code in CER_LANGUAGES:
            return "".join(normalized.split())
        return " ".join(normalized.split())


def wer_metrics(references: list[str], hypotheses: list[str], languages: list[str | None],
                english_spelling: dict[str, str] | None = None) -> dict[str, float]:
    """Corpus WER over clips in space-delimited languages and CER over the others, after normalisation.

    ``languages`` holds a Whisper language name or code per clip (None: English). Returns ``{"wer": ...}``
    and/or ``{"cer": ...}``: a key is present when its clips have at least one reference word (character).
    """
    import jiwer

    if not (len(references) == len(hypotheses) == len(languages)):
        raise ValueError(f"{len(references)} references, {len(hypotheses)} hypotheses, {len(languages)} languages")
    normalize = TextNormalizer(english_spelling)
    pairs: dict[str, tuple[list[str], list[str]]] = {"wer": ([], []), "cer": ([], [])}
    for reference, hypothesis, language in zip(references, hypotheses, languages):
        kind = "cer" if uses_cer(language) else "wer"
        pairs[kind][0].append(normalize(reference, language))
        pairs[kind][1].append(normalize(hypothesis, language))
    metrics = {}
    for kind, (refs, hyps) in pairs.items():
        if not refs:
            continue
        out = (jiwer.process_characters if kind == "cer" else jiwer.process_words)(refs, hyps)
        total = out.substitutions + out.deletions + out.hits
        if total:
            metrics[kind] = (out.substitutions + out.deletions + out.insertions) / total
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Batched generation


class GenerationCollator:
    """Log-mel features, the decoder prefix each clip is trained with, and the clip's dataset index.

    Works on :class:`orpo.data.PreferenceDataset` items. A prefix without ``<|notimestamps|>`` (a model
    trained with timestamps) gets it appended: evaluation scores the text only.
    """

    def __init__(self, no_timestamps_id: int):
        self.no_timestamps_id = no_timestamps_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        prefixes = []
        for f in features:
            ids, prefix_len = f["segments"][0]
            prefix = list(ids[:prefix_len])
            if self.no_timestamps_id not in prefix:
                prefix.append(self.no_timestamps_id)
            prefixes.append(prefix)
        if len({len(p) for p in prefixes}) != 1:
            raise ValueError(f"decoder prefixes of different lengths in one batch: {prefixes}")
        import numpy as np

        return {
            "input_features": torch.from_numpy(np.stack([f["input_features"] for f in features])),
            "decoder_input_ids": torch.tensor(prefixes, dtype=torch.long),
            "sample_index": torch.tensor([f["index"] for f in features], dtype=torch.long),
        }


def make_generation_loader(dataset: PreferenceDataset, tokenizer, batch_size: int, num_workers: int = 0) -> DataLoader:
    """An unshuffled loader over ``dataset`` for :func:`generate_transcripts` (prepare it with Accelerate)."""
    no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=GenerationCollator(no_timestamps))


def whisper_for_generation(model: torch.nn.Module, accelerator=None) -> torch.nn.Module:
    """The WhisperForConditionalGeneration inside a (DDP/compiled) ORPOWhisper or PEFT wrapper."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    model = getattr(model, "whisper", model)  # ORPOWhisper
    if hasattr(model, "get_base_model"):  # PEFT: adapters stay active in the base model's layers
        model = model.get_base_model()
    return model


def _training_modes(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Each submodule's train/eval flag, to put back exactly after evaluating (a module kept in eval stays so)."""
    return [(module, module.training) for module in model.modules()]


def _restore_training_modes(modes: list[tuple[torch.nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def generate_transcripts(model: torch.nn.Module, loader, accelerator, tokenizer, num_beams: int = 1,
                         max_length: int = 225, desc: str = "generate") -> dict[int, str]:
    """Transcribe every clip of ``loader`` (a prepared :func:`make_generation_loader`); ``{index: text}``.

    Each process generates its shard; the texts are gathered (``gather_object``) so every process
    returns the same full mapping. Duplicates that even batches add are dropped by index. ``max_length``
    counts the decoder prefix (as Whisper's ``generation_max_length`` does) and is capped at the model's
    ``max_target_positions``.
    """
    from accelerate.utils import gather_object
    from transformers import GenerationMixin

    whisper = whisper_for_generation(model, accelerator)
    modes = _training_modes(whisper)
    whisper.eval()
    max_length = min(max_length, whisper.config.max_target_positions)
    generation_config = copy.deepcopy(whisper.generation_config)
    generation_config.forced_decoder_ids = None  # old hub configs: the prefix is given here
    generation_config.num_beams = num_beams
    generation_config.do_sample = False
    generation_config.use_cache = True
    generation_config.max_new_tokens = None
    device = next(whisper.parameters()).device
    dtype = whisper.get_encoder().conv1.weight.dtype
    local: list[tuple[int, str]] = []
    disable = accelerator is not None and not accelerator.is_local_main_process
    autocast = accelerator.autocast() if accelerator is not None else torch.autocast(device.type, enabled=False)
    try:
        with torch.no_grad(), autocast:
            for batch in tqdm(loader, desc=desc, leave=False, disable=disable):
                prefix = batch["decoder_input_ids"].to(device)
                # GenerationMixin.generate, not Whisper's own: the decoder prefix is exactly the training
                # prefix, per clip, and needs no language tables in the generation config.
                features = batch["input_features"].to(device=device, dtype=dtype)
                generation_config.max_length = max(max_length, prefix.shape[1] + 1)
                sequences = GenerationMixin.generate(
                    whisper,
                    input_features=features,
                    # All frames are real input (Whisper pads audio to 30 s itself); the mask only tells
                    # generate that the batch needs no padding mask.
                    attention_mask=torch.ones(features.shape[0], features.shape[-1], dtype=torch.long, device=device),
                    decoder_input_ids=prefix,
                    generation_config=generation_config,
                    **generation_kwargs(accelerator),  # synced_gpus under multi-process ZeRO-3
                )
                if not isinstance(sequences, torch.Tensor):
                    sequences = sequences.sequences
                texts = tokenizer.batch_decode(sequences[:, prefix.shape[1]:], skip_special_tokens=True)
                local += [(int(i), t.strip()) for i, t in zip(batch["sample_index"].tolist(), texts)]
    finally:
        _restore_training_modes(modes)
    gathered = gather_object(local) if accelerator is not None and accelerator.num_processes > 1 else local
    return dict(sorted(gathered))


def sample_language(dataset: PreferenceDataset, index: int, tokenizer) -> str:
    """The clip's language code: its own field, else the language token of its prefix, else English."""
    item = dataset.items[index]
    if item.sample.language:
        return language_code(item.sample.language)
    ids, prefix_len = item.segments[0]
    for token in tokenizer.convert_ids_to_tokens(ids[1:prefix_len]):
        code = token[2:-2] if token.startswith("<|") and token.endswith("|>") else None
        if code and code not in ("transcribe", "translate", "notimestamps"):
            try:
                return language_code(code)
            except ValueError:
                pass
    return "en"


class WerEvaluator:
    """Generation-based WER/CER on a :class:`PreferenceDataset`, for the training loop.

    Built once (it prepares its own loader); each call transcribes the whole set with the model as it is
    and returns ``{"eval/wer": ..., "eval/cer": ...}`` (the keys that apply). The texts of the latest
    call with each ``tag`` are kept for :meth:`samples` and :func:`write_eval_results`.
    """

    def __init__(self, dataset: PreferenceDataset, tokenizer, accelerator, batch_size: int = 8,
                 num_beams: int = 1, max_length: int = 225, num_workers: int = 0):
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.num_beams = num_beams
        self.max_length = max_length
        loader = make_generation_loader(dataset, tokenizer, batch_size, num_workers)
        self.loader = accelerator.prepare(loader) if accelerator is not None else loader
        self.languages = [sample_language(dataset, i, tokenizer) for i in range(len(dataset))]
        self.references = [item.sample.chosen for item in dataset.items]
        self.transcripts: dict[str, dict[int, str]] = {}

    @classmethod
    def from_config(cls, cfg, dataset: PreferenceDataset, tokenizer, accelerator) -> "WerEvaluator":
        return cls(dataset, tokenizer, accelerator, batch_size=cfg.per_device_eval_batch_size,
                   num_beams=cfg.generation_num_beams, max_length=cfg.generation_max_length,
                   num_workers=cfg.num_workers)

    def __call__(self, model: torch.nn.Module, tag: str = "tuned") -> dict[str, float]:
        texts = generate_transcripts(model, self.loader, self.accelerator, self.tokenizer, self.num_beams,
                                     self.max_length, desc=f"generate ({tag})")
        missing = set(range(len(self.dataset))) - set(texts)
        if missing:
            raise RuntimeError(f"no transcript for clips {sorted(missing)[:10]}")
        self.transcripts[tag] = texts
        hypotheses = [texts[i] for i in range(len(self.dataset))]
        mapping = getattr(self.tokenizer, "english_spelling_normalizer", None)
        return {f"eval/{k}": v for k, v in wer_metrics(self.references, hypotheses, self.languages, mapping).items()}

    def samples(self) -> list[dict]:
        """Per clip: audio path, language, reference and the hypothesis of each tag evaluated."""
        rows = []
        for i, item in enumerate(self.dataset.items):
            audio = str(item.sample.audio_path) if item.sample.audio_path is not None else item.sample.source
            row = {"audio": audio, "language": self.languages[i], "reference": item.sample.chosen}
            for tag, texts in self.transcripts.items():
                row["hypothesis" if tag == "tuned" else f"{tag}_hypothesis"] = texts.get(i)
            rows.append(row)
        return rows


# ---------------------------------------------------------------------------------------------------------
# Preference metrics (eval loss, rewards) for the command line


def preference_metrics(model: torch.nn.Module, loader, accelerator, alpha: float, desc: str = "score") -> dict[str, float]:
    """ORPO eval loss and rewards of an :class:`orpo.model.ORPOWhisper` on a prepared preference loader.

    Means over clips of all processes, under TRL's names with an ``eval/`` prefix, as the trainer logs.
    """
    from orpo.loss import orpo_loss

    sums: dict[str, float] = {}
    seen: set[int] = set()
    modes = _training_modes(model)
    model.eval()
    disable = accelerator is not None and not accelerator.is_local_main_process
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc, leave=False, disable=disable):
                out = model(batch)
                _, per_clip = orpo_loss(out["logps_chosen"], out["logps_rejected"], out["rejected_mask"],
                                        out["nll_chosen"], alpha)
                rows = {"index": batch["sample_index"], **per_clip}
                if accelerator is not None:
                    rows = accelerator.gather_for_metrics(rows)
                for k, index in enumerate(rows["index"].tolist()):
                    if index in seen:
                        continue
                    seen.add(index)
                    for name, values in per_clip.items():
                        sums[name] = sums.get(name, 0.0) + float(rows[name][k])
    finally:
        _restore_training_modes(modes)
    return {f"eval/{name}": value / len(seen) for name, value in sorted(sums.items())}


# ---------------------------------------------------------------------------------------------------------
# Reports


def _metric(results: dict | None, key: str):
    if not results:
        return None
    value = results.get(f"eval/{key}", results.get(key))
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _format_value(value, percent: bool) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{100 * value:.2f}%" if percent else f"{value:.4f}"


def _format_change(before, after, percent: bool) -> str:
    if before is None or after is None:
        return "-"
    change = after - before
    return f"{100 * change:+.2f} pts" if percent else f"{change:+.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    line = lambda cells: "| " + " | ".join(  # noqa: E731
        cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if c else "-" * (w + 2) for c, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def format_comparison(base: dict | None, tuned: dict | None) -> str:
    """A Markdown table of WER, CER, eval loss, reward accuracy and margin: base, tuned and change.

    Keys may carry the ``eval/`` prefix or not; rows neither side has are left out. With ``base`` None
    (no ``eval_before_train``) it is a one-column table of ``tuned``.
    """
    present = [r for r in REPORT_ROWS if _metric(base, r[0]) is not None or _metric(tuned, r[0]) is not None]
    if base is None:
        return _table(["metric", "value"], [[label, _format_value(_metric(tuned, key), pct)]
                                             for key, label, pct in present])
    rows = [[label, _format_value(_metric(base, key), pct), _format_value(_metric(tuned, key), pct),
             _format_change(_metric(base, key), _metric(tuned, key), pct)] for key, label, pct in present]
    return _table(["metric", "base", "tuned", "change"], rows)


def logged_base_results(output_dir: str | Path) -> dict[str, float] | None:
    """The base model's evaluation (``eval/...`` at step 0) from ``output_dir/metrics.jsonl``, if logged.

    A resumed run does not evaluate the base model again; this gives the comparison its base column back.
    """
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    base = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step") == 0 and any(k.startswith("eval/") for k in record):
            base = {k: v for k, v in record.items() if k.startswith("eval/")}
    return base


def _json_ready(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_ready(value.tolist())
    return value


def write_eval_results(output_dir: str | Path, results: dict, base: dict | None = None,
                       samples: list[dict] | None = None, name: str = "eval_results.json", **extra) -> Path:
    """Write ``output_dir/eval_results.json``: ``{"metrics": results, "base_metrics": base, "samples": ...}``.

    ``results`` are the final evaluation metrics (as logged, ``eval/...``), ``base`` those of the base model
    when ``eval_before_train`` is set, ``samples`` per-clip references and hypotheses
    (:meth:`WerEvaluator.samples`). Written to a temporary file and moved into place.
    """
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**extra, "metrics": results}
    if base is not None:
        record["base_metrics"] = base
        record["comparison"] = format_comparison(base, results).splitlines()
    if samples is not None:
        record["samples"] = samples
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_ready(record), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Command line


# Dataset keys of a recipe that --data needs when it names a Hugging Face dataset rather than a manifest.
DATASET_DEFAULTS = {"dataset_config": None, "audio_column": "audio", "chosen_column": "chosen",
                    "rejected_column": "rejected", "language_column": None}


def run_keys(run: dict, keys) -> dict:
    return {k: run[k] for k in keys if k in run}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orpo.evaluate",
        description="Evaluate a Whisper model on a preference manifest: WER/CER of generated transcripts and "
                    "the ORPO preference metrics (eval loss, reward accuracy and margin).",
    )
    parser.add_argument("--model", required=True,
                        help="a model directory (Hugging Face format), a PEFT adapter directory (adapter_config.json) "
                             "or a training checkpoint directory")
    parser.add_argument("--data", required=True,
                        help="manifest (JSON Lines or JSON array) with chosen/rejected, or a Hugging Face dataset "
                             "(a save_to_disk directory or a load_dataset name; columns as in the run's config.yaml)")
    parser.add_argument("--split", default="test", help="split of a Hugging Face dataset")
    parser.add_argument("--base_model", default=None,
                        help="base model for an adapter or checkpoint directory (default: the adapter's own record "
                             "or the run's config.yaml)")
    parser.add_argument("--language", default=None,
                        help="default language of the clips (a clip's own 'language' wins; default: the run's "
                             "config.yaml, ignored by English-only models)")
    parser.add_argument("--task", default=None, choices=("transcribe", "translate"),
                        help="Whisper task token (default: the run's config.yaml, else transcribe)")
    parser.add_argument("--num_beams", type=int, default=1, help="beam width (1: greedy)")
    parser.add_argument("--max_length", type=int, default=225, help="most decoder tokens per transcript, prefix included")
    parser.add_argument("--batch_size", type=int, default=8, help="clips per batch (per process)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="ORPO alpha for the preference metrics (default: the run's config.yaml, else 0.1)")
    parser.add_argument("--max_audio_len", type=float, default=30.0, help="skip clips longer than this many seconds")
    parser.add_argument("--out", default=None, help="write the metrics and per-clip transcripts to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from orpo.data import PreferenceCollator, WhisperTokens, load_samples
    from orpo.export import load_model, run_config
    from orpo.model import ORPOWhisper
    from orpo.pretrained import is_multilingual

    args = build_parser().parse_args(argv)
    if args.num_beams < 1 or args.batch_size < 1 or args.max_length < 2:
        raise SystemExit("error: --num_beams and --batch_size must be >= 1, --max_length >= 2")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu and distributed else [])
    model_dir = Path(args.model)
    run = run_config(model_dir)  # the run's resolved recipe, when DIR is (in) a training output_dir
    language = args.language or run.get("language")
    task = args.task or run.get("task") or "transcribe"
    alpha = args.alpha if args.alpha is not None else float(run.get("alpha", 0.1))

    # A bad manifest stops here, before any weights load.
    samples = load_samples(args.data, argparse.Namespace(**{**DATASET_DEFAULTS, **run_keys(run, DATASET_DEFAULTS)}),
                           args.split)
    whisper, processor, source = load_model(model_dir, args.base_model)
    whisper.to(accelerator.device).eval()
    # Scored as the run scored its eval set: its timestamps setting (then the data needs segments) and prompt loss.
    tokens = WhisperTokens(processor.tokenizer, is_multilingual(whisper.config), task, bool(run.get("timestamps")),
                           whisper.config.max_target_positions)
    dataset = PreferenceDataset(samples, processor.feature_extractor, tokens, language, 0.0, args.max_audio_len)
    if accelerator.is_main_process:
        logger.info("model: %s; %d clips", source, len(dataset))

    loader = accelerator.prepare(DataLoader(dataset, batch_size=args.batch_size,
                                            collate_fn=PreferenceCollator(pad_token_id=tokens.eot)))
    orpo_model = ORPOWhisper(whisper, disable_prompt_loss=bool(run.get("disable_prompt_loss", True)))
    metrics = preference_metrics(orpo_model, loader, accelerator, alpha)
    evaluator = WerEvaluator(dataset, processor.tokenizer, accelerator, args.batch_size, args.num_beams, args.max_length)
    metrics = {**evaluator(whisper), **metrics}

    if accelerator.is_main_process:
        print(format_comparison(None, metrics))
        summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        print(summary)
        if args.out:
            out = Path(args.out)
            write_eval_results(out.parent, metrics, samples=evaluator.samples(), name=out.name,
                               model=str(model_dir), model_source=source, data=str(args.data),
                               num_beams=args.num_beams, max_length=args.max_length, alpha=alpha)
            print(f"wrote {out}")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
