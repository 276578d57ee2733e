"""What every objective shares: a clip's rejected transcripts, several or one, averaged into one term per clip.

A clip with K rejected transcripts forms K (chosen, rejected) pairs. Every objective computes its term per pair,
averages the pairs of a clip (each clip weighs the same, however many rejected it has) and then averages the
clips; so does every metric. A batch split across processes or micro-batches therefore averages back to the
batch's value.
"""

from __future__ import annotations

import torch

# The per-clip metrics every objective returns (TRL's names); evaluations log them with an "eval/" prefix.
METRIC_NAMES = (
    "loss",
    "nll_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
# Evaluations add these, the same for every objective: a model's preferences compare across objectives.
COMPARABLE_METRIC_NAMES = ("preference/accuracy", "preference/margin")


def pair_weights(rejected_mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) weights of the filled rejected slots and (B,) the number of pairs per clip; a clip without a
    rejected transcript is an error (its pair mean would be 0/0)."""
    weights = rejected_mask.to(dtype)
    pairs = weights.sum(dim=1)
    if bool((pairs == 0).any()):
        raise ValueError("every clip needs at least one rejected transcript")
    return weights, pairs


def pair_mean(values: torch.Tensor, weights: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """(B,) mean over each clip's filled slots of (B, K) per-pair ``values``."""
    return (values * weights).sum(dim=1) / pairs


def reward_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, scale: float, weights: torch.Tensor, pairs: torch.Tensor
) -> dict[str, torch.Tensor]:
    """TRL's reward metrics, per clip, from the score each objective compares: (B,) for the chosen transcript and
    (B, K) for the rejected ones (a log-prob, or its change from the reference model). A reward is ``scale``
    times the score; a pair counts as won when the chosen score is the higher one."""
    return {
        "rewards/chosen": scale * chosen,
        "rewards/rejected": scale * pair_mean(rejected, weights, pairs),
        "rewards/accuracies": pair_mean((chosen[:, None] > rejected).to(chosen.dtype), weights, pairs),
        "rewards/margins": scale * pair_mean(chosen[:, None] - rejected, weights, pairs),
    }


def objective_metrics(
    per_clip_loss: torch.Tensor,
    nll: torch.Tensor,
    rewards: dict[str, torch.Tensor],
    logps_chosen: torch.Tensor,
    logps_rejected: torch.Tensor,
    weights: torch.Tensor,
    pairs: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The per-clip metrics every objective returns (:data:`METRIC_NAMES`), detached: its loss, the chosen NLL, the
    ``rewards`` (:func:`reward_metrics`) and the log-probs it compares (a clip's rejected ones averaged)."""
    with torch.no_grad():
        metrics = {
            "loss": per_clip_loss,
            "nll_loss": nll,
            **rewards,
            "logps/chosen": logps_chosen,
            "logps/rejected": pair_mean(logps_rejected, weights, pairs),
        }
    return {name: value.detach() for name, value in metrics.items()}


def comparable_preference(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per clip, whatever the objective: the share of its pairs whose chosen transcript has the higher average
    log-prob (``preference/accuracy``) and the mean gap of the average log-probs (``preference/margin``)."""
    chosen, rejected = out["logps_chosen"].float(), out["logps_rejected"].float()
    weights, pairs = pair_weights(out["rejected_mask"], chosen.dtype)
    return {
        "preference/accuracy": pair_mean((chosen[:, None] > rejected).float(), weights, pairs),
        "preference/margin": pair_mean(chosen[:, None] - rejected, weights, pairs),
    }
