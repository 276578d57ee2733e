"""SimPO (Meng, Xia, Chen 2024): a reference-free margin between length-normalised log-probabilities.

For clip i with chosen average log-prob ``lc`` and rejected ``lr_k`` (averages over transcript tokens)::

    loss_i = mean_k -logsigmoid(beta * (lc - lr_k) - gamma)
    loss   = mean_i loss_i

``gamma`` is the target reward margin. The chosen NLL is not part of the loss (TRL's ``CPOTrainer`` with
``loss_type="simpo"`` and ``cpo_alpha=0``); it is logged as ``nll_loss``. Rewards are ``beta`` times the
average log-probs, as in TRL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orpo.loss.pairs import objective_metrics, pair_mean, pair_weights, reward_metrics


def simpo_loss(
    logps_chosen: torch.Tensor,
    logps_rejected: torch.Tensor,
    rejected_mask: torch.Tensor,
    nll_chosen: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO loss and per-clip metrics from (B,) / (B, K) average log-probs (arguments as ``orpo_loss``)."""
    dtype = torch.promote_types(logps_chosen.dtype, torch.float32)
    lc, lr, nll = logps_chosen.to(dtype), logps_rejected.to(dtype), nll_chosen.to(dtype)
    weights, pairs = pair_weights(rejected_mask, dtype)
    per_clip_loss = pair_mean(-F.logsigmoid(beta * (lc[:, None] - lr) - gamma), weights, pairs)
    rewards = reward_metrics(lc, lr, beta, weights, pairs)
    return per_clip_loss.mean(), objective_metrics(per_clip_loss, nll, rewards, lc, lr, weights, pairs)
