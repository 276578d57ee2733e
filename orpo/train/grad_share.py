"""How much of the update the odds-ratio term makes (``log_grad_share``): the gradients of the ORPO loss's two terms
taken apart on one micro-batch.

ORPO's loss is ``NLL + alpha * L_OR`` with ``L_OR = -mean log sigmoid(log odds)``. Whether the odds-ratio term
changes training at all depends on the size of ``alpha * grad L_OR`` next to ``grad NLL``, and on their angle:
a small share, or a gradient parallel to the NLL's, leaves the run close to plain fine-tuning. Logged as
``grad_norm/nll``, ``grad_norm/odds_ratio`` (alpha-weighted), ``grad_share/odds_ratio`` (their ratio) and
``grad_cosine`` (the cosine of ``grad NLL`` and ``grad L_OR``; alpha does not change it).

The probe runs a forward of its own on the unwrapped model (no DDP hooks, no effect on the gradients being
accumulated) under a forked random state, so the training run draws exactly what it would draw without it.
"""

from __future__ import annotations

import torch

from orpo.loss.orpo import orpo_loss


def _sums(grads_a, grads_b) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(|a|^2, |b|^2, a.b) over parameter-shaped gradients, in float64, one parameter at a time (no flat copy of
    the whole model's gradient)."""
    total = torch.zeros(3, dtype=torch.float64)
    for a, b in zip(grads_a, grads_b):
        if a is None and b is None:
            continue
        a = a.double() if a is not None else torch.zeros_like(b, dtype=torch.float64)
        b = b.double() if b is not None else torch.zeros_like(a)
        total += torch.stack([(a * a).sum(), (b * b).sum(), (a * b).sum()]).cpu()
    return total[0], total[1], total[2]


def gradient_share(model: torch.nn.Module, batch: dict, alpha: float, autocast) -> dict[str, torch.Tensor]:
    """Norms and cosine of the NLL's and the odds-ratio term's gradients over the trainable parameters of
    ``model`` (an unwrapped :class:`orpo.model.orpo_whisper.ORPOWhisper`) on ``batch``; float64 tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    devices = [params[0].device.index or 0] if params[0].device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        with autocast:
            out = model(batch)
            # alpha 1: the loss is NLL + L_OR, so the odds-ratio term is the loss minus the mean NLL
            loss, _ = orpo_loss(
                out["logps_chosen"], out["logps_rejected"], out["rejected_mask"], out["nll_chosen"], 1.0
            )
            nll = out["nll_chosen"].to(loss.dtype).mean()
        odds_term = loss - nll
        grad_nll = torch.autograd.grad(nll, params, retain_graph=True, allow_unused=True)
        grad_odds = torch.autograd.grad(odds_term, params, allow_unused=True)
    nll_sq, odds_sq, dot = _sums(grad_nll, grad_odds)
    nll_norm, odds_norm = nll_sq.sqrt(), odds_sq.sqrt()
    cosine = dot / (nll_norm * odds_norm).clamp(min=1e-300)
    return {
        "grad_norm/nll": nll_norm,
        "grad_norm/odds_ratio": alpha * odds_norm,
        "grad_share/odds_ratio": alpha * odds_norm / nll_norm.clamp(min=1e-300),
        "grad_cosine": cosine,
    }
