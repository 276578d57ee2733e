"""Training curves from ``output_dir/metrics.jsonl``: ``plot_training_curves(output_dir)`` -> training_curves.png.

Panels: loss, NLL loss, reward margin, reward accuracy (training records as lines, ``eval/...`` records as
markers on the same axes), WER/CER of the test set, of ``regression_data`` and of the training clips a pair
refresh decoded, and the learning rate; when
logged, the regression set's language identification accuracy and the odds-ratio term's gradient share.
Records are ``{"step": N, "loss": ...}`` (training) and ``{"step": N, "eval/loss": ...}`` (evaluation; step 0
is the base model when ``eval_before_train`` or ``regression_data`` is set). A step logged twice (a resumed run
appends) keeps its latest value.

Also a command: ``whisper-orpo plot OUTPUT_DIR`` (or ``python -m orpo.plots OUTPUT_DIR``).
"""

from __future__ import annotations

import math
from pathlib import Path

from orpo.files import staged_file
from orpo.train.logs import read_metrics

# (title, training key, eval key, y-axis as a percentage, y-axis label)
PANELS = [
    ("loss", "loss", "eval/loss", False, "loss (the loss_type's objective)"),
    ("NLL loss (chosen)", "nll_loss", "eval/nll_loss", False, "NLL per token of the chosen (nats)"),
    ("rewards/margins", "rewards/margins", "eval/rewards/margins", False, "reward margin (chosen - rejected)"),
    ("rewards/accuracies", "rewards/accuracies", "eval/rewards/accuracies", False, "share of pairs chosen > rejected"),
]
ERROR_RATE_LABEL = "error rate (WER, CER)"
LEARNING_RATE_LABEL = "learning rate"
TRAIN_COLOR, EVAL_COLOR, CER_COLOR, REGRESSION_COLOR = "tab:blue", "tab:orange", "tab:green", "tab:brown"
# (key, label, colour, marker) of the error-rate panel's series
ERROR_RATE_SERIES = [
    ("eval/wer", "eval WER", EVAL_COLOR, "o"),
    ("eval/cer", "eval CER", CER_COLOR, "s"),
    ("regression/wer", "regression WER", REGRESSION_COLOR, "^"),
    ("regression/cer", "regression CER", "tab:olive", "v"),
    ("refresh/wer", "on-policy training WER (pair refresh)", "tab:cyan", "D"),
    ("refresh/cer", "on-policy training CER (pair refresh)", "tab:pink", "d"),
]


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``, sorted by step, the latest record winning for a repeated step."""
    points = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            points[record["step"]] = float(value)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _annotate_ends(ax, steps, values, percent: bool, color: str) -> None:
    """Label the first and last value of an eval series (base and tuned, when it starts at step 0)."""
    if not steps:
        return
    fmt = (lambda v: f"{100 * v:.1f}%") if percent else (lambda v: f"{v:.3g}")
    ends = [0] if len(steps) == 1 else [0, len(steps) - 1]
    for i in ends:
        label = ("base " if steps[i] == 0 and len(steps) > 1 else "") + fmt(values[i])
        ha = "center" if len(steps) == 1 else ("left" if i == 0 else "right")
        ax.annotate(
            label, (steps[i], values[i]), textcoords="offset points", xytext=(0, 6), ha=ha, fontsize=8, color=color
        )


def _finish(ax, title: str, ylabel: str, has_data: bool, percent: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    ax.set_title(title)
    ax.margins(x=0.04, y=0.12)  # room for the value labels
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if has_data:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


def _metric_panel(ax, records: list[dict], title, train_key, eval_key, percent, ylabel) -> None:
    """Training values as a line, evaluations as markers on the same axes."""
    steps, values = series(records, train_key)
    eval_steps, eval_values = series(records, eval_key)
    if steps:
        ax.plot(steps, values, color=TRAIN_COLOR, linewidth=1.5, label=f"train {train_key}")
    if eval_steps:
        ax.plot(eval_steps, eval_values, color=EVAL_COLOR, marker="o", linestyle="--", label=eval_key)
        _annotate_ends(ax, eval_steps, eval_values, percent, EVAL_COLOR)
    if train_key == "rewards/accuracies":
        ax.set_ylim(-0.05, 1.05)
    if train_key == "rewards/margins" and (steps or eval_steps):
        ax.axhline(0.0, color="gray", linewidth=0.8)
    _finish(ax, title, ylabel, bool(steps or eval_steps), percent)


def _error_rate_panel(ax, records: list[dict]) -> None:
    """Test-set WER/CER and, with ``regression_data``, the regression set's (the forgetting guard's) beside them;
    with ``refresh_pairs_steps``, the model's WER on the training clips each refresh decoded (on-policy)."""
    shown = []
    for key, label, color, marker in ERROR_RATE_SERIES:
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, color=color, marker=marker, label=label)
            _annotate_ends(ax, steps, values, True, color)
            shown += values
    if shown:
        ax.set_ylim(0, 1.15 * max(shown) or 1.0)
    _finish(ax, "error rate (generated transcripts)", ERROR_RATE_LABEL, bool(shown), True)


def _language_id_panel(ax, records: list[dict]) -> None:
    steps, values = series(records, "regression/language_accuracy")
    ax.plot(steps, values, color=REGRESSION_COLOR, marker="o", label="regression language ID accuracy")
    _annotate_ends(ax, steps, values, True, REGRESSION_COLOR)
    ax.set_ylim(-0.05, 1.05)
    _finish(ax, "language identification (regression set)", "clips whose language the model detects", True, True)


def _grad_share_panel(ax, records: list[dict]) -> None:
    """How much of the update the odds-ratio term makes: its gradient norm over the NLL's (log_grad_share)."""
    steps, values = series(records, "grad_share/odds_ratio")
    ax.plot(steps, values, color="tab:red", label="|grad odds-ratio term| / |grad NLL|")
    cos_steps, cosines = series(records, "grad_cosine")
    if cos_steps:
        ax.plot(cos_steps, cosines, color="tab:gray", linestyle=":", label="cosine of the two gradients")
    ax.axhline(0.0, color="gray", linewidth=0.8)
    _finish(ax, "odds-ratio term's share of the gradient", "ratio of gradient norms; cosine", True)


def _learning_rate_panel(ax, records: list[dict]) -> None:
    lr_steps, lr = series(records, "learning_rate")
    if lr_steps:
        ax.plot(lr_steps, lr, color="tab:purple", label="learning_rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _finish(ax, "learning rate", LEARNING_RATE_LABEL, bool(lr_steps))


def training_curves_figure(records: list[dict], title: str):
    """The six panels of ``records`` (metrics.jsonl) in a matplotlib Figure (Agg: no display, no pyplot state),
    and a third row for language identification and the odds-ratio term's gradient share when they were logged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    optional = [
        draw
        for key, draw in (
            ("regression/language_accuracy", _language_id_panel),
            ("grad_share/odds_ratio", _grad_share_panel),
        )
        if series(records, key)[0]
    ]
    rows = 3 if optional else 2
    fig = Figure(figsize=(15, 4.25 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 3).ravel()
    for ax, panel in zip(axes, PANELS):
        _metric_panel(ax, records, *panel)
    _error_rate_panel(axes[4], records)
    _learning_rate_panel(axes[5], records)
    for ax, draw in zip(axes[6:], optional):
        draw(ax, records)
    for ax in axes[6 + len(optional) :]:
        ax.set_visible(False)
    fig.suptitle(title + ("" if records else " (no records yet)"))
    return fig


def plot_training_curves(
    output_dir: str | Path, metrics_file: str = "metrics.jsonl", filename: str = "training_curves.png"
) -> Path:
    """Draw the training curves of a run into ``output_dir/training_curves.png`` and return its path.

    Panels without data say so instead of failing, so a short run (or one without test data) still gets
    a picture. Raises FileNotFoundError when ``output_dir`` has no metrics file.
    """
    output_dir = Path(output_dir)
    metrics_path = output_dir / metrics_file
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} does not exist: no metrics to plot")
    fig = training_curves_figure(read_metrics(metrics_path), f"whisper-orpo: {output_dir.resolve().name}")
    path = output_dir / filename
    with staged_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path
