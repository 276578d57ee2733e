"""The forgetting guard's decisions: how far ``regression/wer`` rose above the base model's, and what a rise past
``max_regression`` does (stops the run; with ``load_best_model_at_end``, keeps that evaluation out of selection).

The base model's regression metrics are the step-0 record of ``metrics.jsonl`` (a resumed run reads them back);
the change is logged beside each evaluation as ``regression/wer_change`` (a fraction, like the rate itself;
``max_regression`` is in points: 2.0 is a rise from 0.10 to 0.12).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from orpo.config import TrainConfig

logger = logging.getLogger("orpo")

RATES = ("regression/wer", "regression/cer")


def regression_rate(metrics: dict) -> str | None:
    """The key of the regression error rate in ``metrics``: WER, or CER for a set of unspaced languages only."""
    return next((key for key in RATES if key in metrics), None)


@dataclass
class ForgettingGuard:
    """Change of the regression error rate from the base model, and the evaluations ``max_regression`` ruled out."""

    max_regression: float | None  # absolute points; None: measured and reported, never acted on
    exclude: bool  # True (load_best_model_at_end): over the limit is never selected; False: it stops the run
    base: dict = field(default_factory=dict)  # the base model's regression/... metrics
    over_limit: list[int] = field(default_factory=list)  # steps whose evaluation rose past max_regression
    stopped_at: int | None = None  # the step whose regression ended the run

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "ForgettingGuard":
        return cls(cfg.max_regression, cfg.load_best_model_at_end)

    def set_base(self, metrics: dict) -> None:
        """The base model's regression metrics (the step-0 evaluation, or its record when a run resumes)."""
        self.base = {k: v for k, v in metrics.items() if k.startswith("regression/")}

    def add_change(self, metrics: dict) -> dict:
        """``metrics`` with ``regression/wer_change`` (or ``cer``) from the base model added."""
        key = regression_rate(metrics)
        if key is None or key not in self.base:
            return metrics
        return {**metrics, f"{key}_change": metrics[key] - self.base[key]}

    def rose_too_far(self, step: int, metrics: dict) -> bool:
        """Whether this evaluation's regression rate is more than ``max_regression`` points above the base's
        (counted in :attr:`over_limit` and logged)."""
        key = regression_rate(metrics)
        if self.max_regression is None or key is None or f"{key}_change" not in metrics:
            return False
        change = 100 * metrics[f"{key}_change"]
        if change <= self.max_regression:
            return False
        if step not in self.over_limit:
            self.over_limit.append(step)
        logger.warning(
            "step %d: %s rose %.2f points above the base model's (%.2f%% -> %.2f%%), over max_regression %g%s",
            step,
            key,
            change,
            100 * self.base[key],
            100 * metrics[key],
            self.max_regression,
            "; this evaluation is not a candidate for the best model" if self.exclude else "",
        )
        return True

    def stop(self, step: int) -> str:
        """End the run at ``step``; the reason, for the log and ``eval_results.json``."""
        self.stopped_at = step
        return (
            f"forgetting guard at step {step}: the regression error rate rose more than max_regression "
            f"{self.max_regression:g} points above the base model's"
        )

    def report(self) -> dict:
        """What the guard measured and did, for ``eval_results.json``."""
        if self.max_regression is None:
            action = "none (no max_regression)"
        elif not self.over_limit:
            action = "never over the limit"
        elif self.stopped_at is not None:
            action = f"stopped the run at step {self.stopped_at}"
        else:
            action = f"left steps {', '.join(map(str, self.over_limit))} out of model selection"
        return {**asdict(self), "action": action}
