"""ORPO (Hong, Lee, Thorne 2024): the chosen NLL plus an odds-ratio term, on per-clip average log-probabilities.

For clip i with chosen average log-prob ``lc`` and rejected ``lr_k`` (averages over transcript tokens)::

    log_odds_k = (lc - lr_k) - (log(1 - exp(lc)) - log(1 - exp(lr_k)))
    loss_i     = nll_i - alpha * mean_k logsigmoid(log_odds_k)          (k: the clip's rejected transcripts)
    loss       = mean_i loss_i

Metrics use TRL's names (``rewards/*`` are ``alpha`` times the average log-probs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from orpo.loss.pairs import METRIC_NAMES, objective_metrics, pair_mean, pair_weights, reward_metrics

# Average log-probs are capped here before the odds: P(y) <= 1 - 1e-10, so a transcript the model
# is certain of (an average log-prob that rounds to 0.0) cannot make log(1 - P) infinite.
MAX_AVG_LOGP = -1e-10
_LN2 = math.log(2.0)
# ORPO's metrics: every objective's, and the odds ratio's own two (TRL's names).
ORPO_METRIC_NAMES = METRIC_NAMES + ("log_odds_ratio", "log_odds_chosen")


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
    weights, pairs = pair_weights(rejected_mask, dtype)

    log_odds = (lc[:, None] - lr) - (log1mexp(lc)[:, None] - log1mexp(lr))
    log_odds_ratio = pair_mean(F.logsigmoid(log_odds), weights, pairs)
    per_clip_loss = nll - alpha * log_odds_ratio

    rewards = reward_metrics(lc, lr, alpha, weights, pairs)
    metrics = objective_metrics(per_clip_loss, nll, rewards, lc, lr, weights, pairs)
    with torch.no_grad():
        metrics |= {"log_odds_ratio": log_odds_ratio.detach(), "log_odds_chosen": pair_mean(log_odds, weights, pairs)}
    return per_clip_loss.mean(), metrics
