"""CPO (Xu et al. 2024): a reference-free sigmoid preference term on summed log-probabilities, plus the NLL.

For clip i with chosen summed log-prob ``sc`` and rejected ``sr_k`` (sums over transcript tokens)::

    loss_i = mean_k -logsigmoid(beta * (sc - sr_k)) + cpo_alpha * nll_i
    loss   = mean_i loss_i

``nll_i`` is the chosen transcript's mean token NLL, as in the ORPO objective (TRL's ``CPOTrainer`` with
``loss_type="sigmoid"``: its ``cpo_alpha`` weighs the same behaviour-cloning term). Rewards are ``beta`` times
the summed log-probs, as in TRL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orpo.loss.pairs import objective_metrics, pair_mean, pair_weights, reward_metrics


def cpo_loss(
    sum_logps_chosen: torch.Tensor,
    sum_logps_rejected: torch.Tensor,
    rejected_mask: torch.Tensor,
    nll_chosen: torch.Tensor,
    beta: float,
    cpo_alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CPO loss and per-clip metrics from (B,) / (B, K) summed log-probs and the (B,) chosen NLL."""
    dtype = torch.promote_types(sum_logps_chosen.dtype, torch.float32)
    sc, sr, nll = sum_logps_chosen.to(dtype), sum_logps_rejected.to(dtype), nll_chosen.to(dtype)
    weights, pairs = pair_weights(rejected_mask, dtype)
    preference = pair_mean(-F.logsigmoid(beta * (sc[:, None] - sr)), weights, pairs)
    per_clip_loss = preference + cpo_alpha * nll
    rewards = reward_metrics(sc, sr, beta, weights, pairs)
    return per_clip_loss.mean(), objective_metrics(per_clip_loss, nll, rewards, sc, sr, weights, pairs)
