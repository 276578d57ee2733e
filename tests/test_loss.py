"""The ORPO loss against an independent high-precision computation, and its numerical stability."""

import math

import mpmath
import pytest
import torch

from orpo.loss.orpo import MAX_AVG_LOGP, log1mexp, orpo_loss

TRL_METRICS = {
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
}
mpmath.mp.dps = 50


def reference_orpo(lc, lr_lists, nll, alpha):
    """ORPO straight from the paper, in 50-digit arithmetic: odds = P / (1 - P), P = exp(mean log-prob)."""
    losses = []
    for c, rs, n in zip(lc, lr_lists, nll):
        c = min(mpmath.mpf(c), mpmath.mpf(MAX_AVG_LOGP))
        terms = []
        for r in rs:
            r = min(mpmath.mpf(r), mpmath.mpf(MAX_AVG_LOGP))
            odds_c = mpmath.exp(c) / (1 - mpmath.exp(c))
            odds_r = mpmath.exp(r) / (1 - mpmath.exp(r))
            log_odds = mpmath.log(odds_c) - mpmath.log(odds_r)
            terms.append(-mpmath.log(1 + mpmath.exp(-log_odds)))  # log sigmoid
        losses.append(mpmath.mpf(n) - alpha * sum(terms) / len(terms))
    return float(sum(losses) / len(losses))


def test_log1mexp_matches_high_precision():
    x = -torch.logspace(-12, 2, 200, dtype=torch.float64)
    got = log1mexp(x)
    want = torch.tensor([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-7, atol=0)
    normal32 = x > -80  # below that, log(1 - exp(x)) is a float32 subnormal
    got32 = log1mexp(x[normal32].float()).double()
    assert torch.allclose(got32, want[normal32], rtol=1e-5, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_reference_on_random_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, slots = 5, 3
    lc = -torch.rand(batch, generator=gen, dtype=torch.float64) * 3
    lr = -torch.rand(batch, slots, generator=gen, dtype=torch.float64) * 3
    mask = torch.rand(batch, slots, generator=gen) < 0.6
    mask[:, 0] = True
    nll = torch.rand(batch, generator=gen, dtype=torch.float64) * 2
    alpha = 0.25
    loss, metrics = orpo_loss(lc, lr, mask, nll, alpha)
    lr_lists = [[lr[i, k].item() for k in range(slots) if mask[i, k]] for i in range(batch)]
    want = reference_orpo(lc.tolist(), lr_lists, nll.tolist(), alpha)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert set(metrics) == TRL_METRICS
    assert all(v.shape == (batch,) for v in metrics.values())
    margins = [alpha * sum(lc[i].item() - r for r in lr_lists[i]) / len(lr_lists[i]) for i in range(batch)]
    assert metrics["rewards/margins"].tolist() == pytest.approx(margins, rel=1e-5)
    accuracies = [sum(lc[i].item() > r for r in lr_lists[i]) / len(lr_lists[i]) for i in range(batch)]
    assert metrics["rewards/accuracies"].tolist() == pytest.approx(accuracies)
    assert metrics["rewards/chosen"].tolist() == pytest.approx((alpha * lc).tolist(), rel=1e-6)


def test_several_rejected_average_the_pairs():
    lc = torch.tensor([-0.5])
    lr = torch.tensor([[-1.0, -2.0]])
    nll = torch.tensor([0.5])
    both, _ = orpo_loss(lc, lr, torch.tensor([[True, True]]), nll, 1.0)
    first, _ = orpo_loss(lc, lr[:, :1], torch.tensor([[True]]), nll, 1.0)
    second, _ = orpo_loss(lc, lr[:, 1:], torch.tensor([[True]]), nll, 1.0)
    assert both.item() == pytest.approx((first.item() + second.item()) / 2, rel=1e-6)


@pytest.mark.parametrize("chosen", [-1e-8, -1e-3, -0.69, -30.0, 0.0])
@pytest.mark.parametrize("rejected", [-1e-8, -0.5, -30.0])
def test_stable_and_finite_near_zero(chosen, rejected):
    """Whisper is often nearly certain: average log-probs close to 0 must not give inf or NaN."""
    lc = torch.tensor([chosen], requires_grad=True)
    lr = torch.tensor([[rejected]], requires_grad=True)
    nll = -lc.detach().clone().requires_grad_(True)
    loss, metrics = orpo_loss(lc, lr, torch.tensor([[True]]), nll, 0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(lc.grad).all() and torch.isfinite(lr.grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    want = reference_orpo([chosen], [[rejected]], [-chosen], 0.1)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_gradient_matches_finite_differences_in_float64():
    lc = torch.tensor([-0.3, -0.01], dtype=torch.float64, requires_grad=True)
    lr = torch.tensor([[-0.8], [-0.02]], dtype=torch.float64, requires_grad=True)
    nll = torch.tensor([0.3, 0.01], dtype=torch.float64)
    mask = torch.ones(2, 1, dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda c, r: orpo_loss(c, r, mask, nll, 0.7)[0], (lc, lr))


def test_clip_without_rejected_is_an_error():
    with pytest.raises(ValueError, match="at least one rejected"):
        orpo_loss(torch.tensor([-1.0]), torch.tensor([[-1.0]]), torch.tensor([[False]]), torch.tensor([1.0]), 0.1)


def test_float32_loss_is_computed_in_float32_from_half_inputs():
    lc = torch.tensor([-0.001], dtype=torch.bfloat16)
    lr = torch.tensor([[-0.002]], dtype=torch.bfloat16)
    loss, _ = orpo_loss(lc, lr, torch.tensor([[True]]), torch.tensor([0.001], dtype=torch.bfloat16), 1.0)
    assert loss.dtype == torch.float32
    want = reference_orpo(
        [lc.float().item()], [[lr.float().item()]], [torch.tensor(0.001, dtype=torch.bfloat16).item()], 1.0
    )
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert math.isfinite(loss.item())
