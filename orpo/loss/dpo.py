"""DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023): preference terms measured against a reference model.

With ``sc``/``sr_k`` the policy's summed log-probs of the chosen and rejected transcripts and ``rc``/``rr_k`` the
reference model's, and ``h_k = (sc - rc) - (sr_k - rr_k)``::

    DPO:  loss_i = mean_k -logsigmoid(beta * h_k)                 (summed log-probs)
    IPO:  loss_i = mean_k (h_k - 1 / (2 * beta)) ** 2             (average log-probs in h_k: sums / token counts)
    loss  = mean_i loss_i

as TRL's ``DPOTrainer`` defines them (``loss_type="sigmoid"`` and ``"ipo"``; IPO on length-normalised
log-probs). Rewards are ``beta`` times the change from the reference, ``logps/*`` the policy's log-probs as the
objective uses them (sums for DPO, averages for IPO). The reference log-probs come with the batch: the trainer
computes them once per pair with the frozen base model (``orpo.eval.reference``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from orpo.loss.pairs import objective_metrics, pair_mean, pair_weights, reward_metrics


def loss_against_reference(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    rejected_mask: torch.Tensor,
    nll_chosen: torch.Tensor,
    beta: float,
    pair_loss: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and per-clip metrics of a ``pair_loss`` of ``h = (chosen - ref_chosen) - (rejected - ref_rejected)``:
    (B,) and (B, K) log-probs of the policy and the reference, as the objective compares them."""
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    policy_chosen, policy_rejected = policy_chosen.to(dtype), policy_rejected.to(dtype)
    weights, pairs = pair_weights(rejected_mask, dtype)
    chosen = policy_chosen - ref_chosen.to(dtype)
    rejected = policy_rejected - ref_rejected.to(dtype)
    per_clip_loss = pair_mean(pair_loss(chosen[:, None] - rejected), weights, pairs)
    rewards = reward_metrics(chosen, rejected, beta, weights, pairs)
    nll = nll_chosen.to(dtype)
    metrics = objective_metrics(per_clip_loss, nll, rewards, policy_chosen, policy_rejected, weights, pairs)
    return per_clip_loss.mean(), metrics


def dpo_loss(
    sum_logps_chosen: torch.Tensor,
    sum_logps_rejected: torch.Tensor,
    ref_logps_chosen: torch.Tensor,
    ref_logps_rejected: torch.Tensor,
    rejected_mask: torch.Tensor,
    nll_chosen: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss and per-clip metrics from (B,) / (B, K) summed log-probs of the policy and the reference."""
    return loss_against_reference(
        sum_logps_chosen,
        sum_logps_rejected,
        ref_logps_chosen,
        ref_logps_rejected,
        rejected_mask,
        nll_chosen,
        beta,
        lambda h: -F.logsigmoid(beta * h),
    )


def ipo_loss(
    logps_chosen: torch.Tensor,
    logps_rejected: torch.Tensor,
    ref_logps_chosen: torch.Tensor,
    ref_logps_rejected: torch.Tensor,
    rejected_mask: torch.Tensor,
    nll_chosen: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO loss and per-clip metrics from (B,) / (B, K) average log-probs of the policy and the reference."""
    return loss_against_reference(
        logps_chosen,
        logps_rejected,
        ref_logps_chosen,
        ref_logps_rejected,
        rejected_mask,
        nll_chosen,
        beta,
        lambda h: (h - 1 / (2 * beta)) ** 2,
    )
