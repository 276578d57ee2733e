"""The ORPO objective (Hong, Lee, Thorne 2024) on per-clip average log-probabilities.

For clip i with chosen average log-prob ``lc`` and rejected ``lr`` (averages over transcript tokens)::

    log_odds = (lc - lr) - (log(1 - exp(lc)) - log(1 - exp(lr)))
    loss_i   = nll_i - alpha * mean_k logsigmoid(log_odds_k)     (k: the clip's rejected transcripts)
    loss     = mean_i loss_i

Every term is a mean over clips, so the loss of a batch split across processes or micro-batches
averages back to the loss of the whole batch. Metrics use TRL's names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Average log-probs are capped here before the odds: P(y) <= 1 - 1e-10, so a transcript the model
# is certain of (an average log-prob that rounds to 0.0) cannot make log(1 - P) infinite.
MAX_AVG_LOGP = -1e-10
_LN2 = math.log(2.0)
# The per-clip metrics orpo_loss returns (TRL's names); evaluations log them with an "eval/" prefix.
METRIC_NAMES = (
    "loss",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012).

    Each branch only sees inputs inside its own domain, so the branch not taken cannot produce an
    inf whose zero-weighted gradient turns into NaN.
    """
    near_zero = x > -_LN2
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(x.clamp(min=-_LN2))),
        torch.log1p(-torch.exp(x.clamp(max=-_LN2))),
    )


def orpo_loss(
    logps_chosen: torch.Tensor,
    logps_rejected: torch.Tensor,
    rejected_mask: torch.Tensor,
    nll_chosen: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO loss and per-clip metrics.

    Args:
        logps_chosen: (B,) average log-prob of each chosen transcript.
        logps_rejected: (B, K) average log-prob of each rejected transcript.
        rejected_mask: (B, K) bool, which rejected slots hold a transcript.
        nll_chosen: (B,) mean negative log-likelihood of each chosen transcript.
        alpha: weight of the odds-ratio term.

    Returns the scalar loss and a dict of detached (B,) tensors: the batch value of each metric is
    their mean, which also holds across processes.
    """
    dtype = torch.promote_types(logps_chosen.dtype, torch.float32)  # float32 or better
    lc = logps_chosen.to(dtype).clamp(max=MAX_AVG_LOGP)
    lr = logps_rejected.to(dtype).clamp(max=MAX_AVG_LOGP)
    nll = nll_chosen.to(dtype)
    weights = rejected_mask.to(dtype)
    pairs = weights.sum(dim=1)
    if bool((pairs == 0).any()):
        raise ValueError("every clip needs at least one rejected transcript")

    log_odds = (lc[:, None] - lr) - (log1mexp(lc)[:, None] - log1mexp(lr))
    ratio = F.logsigmoid(log_odds)

    def per_clip(values: torch.Tensor) -> torch.Tensor:
        return (values * weights).sum(dim=1) / pairs

    log_odds_ratio = per_clip(ratio)
    loss = (nll - alpha * log_odds_ratio).mean()

    with torch.no_grad():
        lr_mean = per_clip(lr)
        metrics = {
            "loss": nll - alpha * log_odds_ratio,
            "nll_loss": nll,
            "log_odds_ratio": log_odds_ratio,
            "log_odds_chosen": per_clip(log_odds),
            "rewards/chosen": alpha * lc,
            "rewards/rejected": alpha * lr_mean,
            "rewards/accuracies": per_clip((lc[:, None] > lr).float()),
            "rewards/margins": alpha * per_clip(lc[:, None] - lr),
            "logps/chosen": lc,
            "logps/rejected": lr_mean,
        }
    return loss, {name: value.detach() for name, value in metrics.items()}
