"""Reports of evaluations: the base-versus-tuned table and ``eval_results.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from orpo.files import write_text_atomic

# Rows of the comparison table: (metric key without the "eval/" prefix, label, shown as a percentage).
REPORT_ROWS = [
    ("wer", "WER", True),
    ("cer", "CER", True),
    ("loss", "eval/loss", False),
    ("rewards/accuracies", "rewards/accuracies", False),
    ("rewards/margins", "rewards/margins", False),
    ("regression/wer", "regression WER", True),
    ("regression/cer", "regression CER", True),
    ("regression/language_accuracy", "regression language ID", True),
]


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

    def line(cells: list[str]) -> str:
        padded = [cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if c else "-" * (w + 2) for c, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def report_rows(*results: dict | None) -> list[tuple[str, str, bool]]:
    """:data:`REPORT_ROWS`, then the regression error rate of each language (``regression/wer/de``) found."""
    per_language = sorted(
        {key for r in results if r for key in r if key.startswith("regression/") and key.count("/") == 2}
    )
    return REPORT_ROWS + [
        (key, f"regression {key.split('/')[1].upper()} ({key.split('/')[2]})", True) for key in per_language
    ]


def format_comparison(base: dict | None, tuned: dict | None) -> str:
    """A Markdown table of WER, CER, eval loss, reward accuracy and margin: base, tuned and change.

    Keys may carry the ``eval/`` prefix or not; rows neither side has are left out. With ``base`` None
    (no ``eval_before_train``) it is a one-column table of ``tuned``.
    """
    present = [
        r for r in report_rows(base, tuned) if _metric(base, r[0]) is not None or _metric(tuned, r[0]) is not None
    ]
    if base is None:
        return _table(
            ["metric", "value"], [[label, _format_value(_metric(tuned, key), pct)] for key, label, pct in present]
        )
    rows = [
        [
            label,
            _format_value(_metric(base, key), pct),
            _format_value(_metric(tuned, key), pct),
            _format_change(_metric(base, key), _metric(tuned, key), pct),
        ]
        for key, label, pct in present
    ]
    return _table(["metric", "base", "tuned", "change"], rows)


def error_rate_key(results: dict) -> str:
    """``wer``, or ``cer`` for a test set of unspaced languages only."""
    return "wer" if _metric(results, "wer") is not None else "cer"


def quality_rows(base: dict | None, tuned: dict, sft: dict | None, tuned_name: str, beams: int) -> list[dict]:
    """The rows of the closing quality table: base and tuned (``tuned_name``: its objective), greedy and
    (``beams`` > 0) beam search, and the plain fine-tuning baseline (``sft``, greedy) when it ran. Preference
    accuracy is the share of test pairs whose chosen transcript has the higher average log-prob, and the margin
    their mean average-log-prob gap: neither depends on the objective, so the rows compare alike."""
    rate = error_rate_key(tuned)
    decodings = [("greedy", rate)] + ([(f"beam {beams}", f"{rate}_beam{beams}")] if beams > 0 else [])
    models = [("base", base, decodings), (tuned_name, tuned, decodings)]
    if sft is not None:
        models.append(("plain fine-tuning (alpha 0)", sft, decodings[:1]))
    rows = []
    for name, results, model_decodings in models:
        for decoding, key in model_decodings:
            rows.append(
                {
                    "model": name,
                    "decoding": decoding,
                    rate: _metric(results, key),
                    "preference_accuracy": _metric(results, "preference/accuracy"),
                    "logp_margin": _metric(results, "preference/margin"),
                }
            )
    return rows


def format_quality_table(rows: list[dict]) -> str:
    """The quality rows as a Markdown table (a model that was not evaluated shows "-")."""
    rate = "wer" if "wer" in rows[0] else "cer"
    header = ["model", "decoding", rate.upper(), "preference accuracy", "log-prob margin"]
    cells = [
        [
            row["model"],
            row["decoding"],
            _format_value(row[rate], True),
            _format_value(row["preference_accuracy"], False),
            _format_value(row["logp_margin"], False),
        ]
        for row in rows
    ]
    return _table(header, cells)


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


def add_to_eval_results(output_dir: str | Path, name: str = "eval_results.json", **entries) -> Path:
    """Add ``entries`` to an ``eval_results.json`` already written (atomically, like the first write)."""
    path = Path(output_dir) / name
    record = {**json.loads(path.read_text(encoding="utf-8")), **entries}
    return write_text_atomic(path, json.dumps(_json_ready(record), indent=2, ensure_ascii=False) + "\n")


def write_eval_results(
    output_dir: str | Path,
    results: dict,
    base: dict | None = None,
    samples: list[dict] | None = None,
    name: str = "eval_results.json",
    **extra,
) -> Path:
    """Write ``output_dir/eval_results.json``: ``{"metrics": results, "base_metrics": base, "samples": ...}``.

    ``results`` are the final evaluation metrics (as logged, ``eval/...``), ``base`` those of the base model
    when ``eval_before_train`` is set, ``samples`` per-clip references and hypotheses
    (:meth:`WerEvaluator.samples`). Written to a temporary file and moved into place.
    """
    path = Path(output_dir) / name
    record = {**extra, "metrics": results}
    if base is not None:
        record["base_metrics"] = base
        record["comparison"] = format_comparison(base, results).splitlines()
    if samples is not None:
        record["samples"] = samples
    return write_text_atomic(path, json.dumps(_json_ready(record), indent=2, ensure_ascii=False) + "\n")
