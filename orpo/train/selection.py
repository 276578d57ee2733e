"""Model selection and early stopping: which evaluation is the best so far, and when evaluations stop improving.

Selection is on when ``load_best_model_at_end`` or ``early_stopping_patience`` asks for it. Every evaluation
during training is then on a checkpoint step (the recipe check asks for ``save_steps == eval_steps``), so the
best model is always a saved one; its checkpoint is kept through rotation, recorded in ``trainer_state.json``
(``best``) and known again after a resume. The metric is the all-process one that evaluations log.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from orpo.config import TrainConfig
from orpo.errors import ConfigError
from orpo.loss.objective import Objective
from orpo.loss.pairs import COMPARABLE_METRIC_NAMES

logger = logging.getLogger("orpo")

ERROR_RATES = ("eval/wer", "eval/cer")
# Which way each logged evaluation metric improves (the preference metrics: higher means the chosen transcript
# is preferred more; losses, log-probs and rewards of rejected transcripts: lower is better).
GREATER_IS_BETTER = {
    **{name: False for name in ERROR_RATES},
    "eval/loss": False,
    "eval/nll_loss": False,
    "eval/log_odds_ratio": True,
    "eval/log_odds_chosen": True,
    "eval/rewards/chosen": True,
    "eval/rewards/rejected": False,
    "eval/rewards/accuracies": True,
    "eval/rewards/margins": True,
    "eval/logps/chosen": True,
    "eval/logps/rejected": False,
    "eval/preference/accuracy": True,
    "eval/preference/margin": True,
}


def selection_on(cfg: TrainConfig) -> bool:
    return cfg.load_best_model_at_end or cfg.early_stopping_patience > 0


def best_metric_name(cfg: TrainConfig, uses_cer: bool) -> str:
    """``metric_for_best_model``, or the error rate the test set is scored with (CER for languages without
    spaces between words, else WER)."""
    if cfg.metric_for_best_model:
        return cfg.metric_for_best_model
    return "eval/cer" if uses_cer else "eval/wer"


def check_metric_name(cfg: TrainConfig, uses_cer: bool) -> None:
    """``metric_for_best_model`` is a metric that evaluations log (before any weights load; the other selection
    keys are checked with the recipe, :meth:`orpo.config.TrainConfig.check_selection`)."""
    if not selection_on(cfg):
        return
    name = best_metric_name(cfg, uses_cer)
    logged = Objective.from_config(cfg).metric_names + COMPARABLE_METRIC_NAMES
    known = sorted([f"eval/{metric}" for metric in logged] + list(ERROR_RATES))
    if name not in known:
        raise ConfigError(
            f"{cfg.origin('metric_for_best_model')}: metric_for_best_model {name!r} is not a metric the "
            f"evaluations log; one of: {', '.join(known)}",
            key="metric_for_best_model",
        )


def greater_is_better(cfg: TrainConfig, name: str) -> bool:
    if cfg.greater_is_better is not None:
        return cfg.greater_is_better
    return GREATER_IS_BETTER[name]


@dataclass
class Best:
    """The best evaluation so far and the early-stopping count, as ``trainer_state.json`` keeps them."""

    metric: str
    value: float | None = None
    step: int | None = None
    checkpoint: str | None = None  # the folder name, ``checkpoint-STEP``; None: the final model
    evaluations_without_improvement: int = 0

    def record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict | None, metric: str) -> "Best":
        if not record:
            return cls(metric)
        if record.get("metric") != metric:
            logger.warning(
                "the checkpoint selected by %s; this run selects by %s: the best so far starts again",
                record.get("metric"),
                metric,
            )
            return cls(metric)
        return cls(**record)


class ModelSelection:
    """Tracks :class:`Best` over a run's evaluations and says when ``early_stopping_patience`` is used up."""

    def __init__(self, cfg: TrainConfig, uses_cer: bool, record: dict | None = None):
        self.name = best_metric_name(cfg, uses_cer)
        self.greater = greater_is_better(cfg, self.name)
        self.threshold = cfg.early_stopping_threshold
        self.patience = cfg.early_stopping_patience
        self.best = Best.from_record(record, self.name)

    def improves(self, value: float) -> bool:
        """Better than the best so far by more than ``early_stopping_threshold`` (a NaN never is)."""
        if not math.isfinite(value):
            return False
        if self.best.value is None:
            return True
        gain = value - self.best.value if self.greater else self.best.value - value
        return gain > self.threshold

    def update(self, step: int, metrics: dict[str, float], checkpoint: str | None, candidate: bool = True) -> bool:
        """Count the evaluation at ``step`` (saved as ``checkpoint``); whether it is the new best. One that is no
        ``candidate`` (the forgetting guard ruled it out) counts as an evaluation without improvement."""
        if self.name not in metrics:
            raise ConfigError(
                f"metric_for_best_model {self.name!r} was not logged by the evaluation at step {step} (logged: "
                f"{', '.join(sorted(metrics))})",
                key="metric_for_best_model",
            )
        value = float(metrics[self.name])
        if candidate and self.improves(value):
            self.best = Best(self.name, value, step, checkpoint, 0)
            logger.info("step %d: new best %s = %.4g", step, self.name, value)
            return True
        self.best.evaluations_without_improvement += 1
        return False

    def out_of_patience(self) -> bool:
        return self.patience > 0 and self.best.evaluations_without_improvement >= self.patience

    def stop_reason(self, step: int) -> str:
        return (
            f"early stopping at step {step}: {self.name} has not improved on {self.best.value:.4g} (step "
            f"{self.best.step}) by more than {self.threshold} in {self.patience} evaluations"
        )
