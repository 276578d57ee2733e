"""Every loss_type against its formula written out independently in 50-digit arithmetic (fresh random inputs, and
extreme log-probs), and the one-pass forward against the two-pass reference for every loss_type: loss and gradients.
"""

from __future__ import annotations

import math
import random

import mpmath
import pytest
import torch
from test_model import EOT, assert_gradients_close, gradients, random_batch, tiny_model

from orpo.loss.objective import DEFAULT_BETA, LOSS_TYPES, Objective
from orpo.loss.orpo import MAX_AVG_LOGP
from orpo.model.orpo_whisper import ORPOWhisper
from orpo.model.reference import two_pass_forward

mpmath.mp.dps = 50
REL = 1e-5  # float32 implementation against the 50-digit reference


def log_sigmoid(x):
    return -mpmath.log(1 + mpmath.exp(-x))


def pair_term(loss_type, c, r, tc, tr, rc, rr, objective):
    """One (chosen, rejected) pair's preference term, from the papers: averages c, r; token counts tc, tr; reference
    summed log-probs rc, rr."""
    beta = mpmath.mpf(objective.preference_beta) if loss_type != "orpo" else None
    if loss_type == "orpo":
        c, r = min(c, mpmath.mpf(MAX_AVG_LOGP)), min(r, mpmath.mpf(MAX_AVG_LOGP))
        odds = lambda a: mpmath.exp(a) / (1 - mpmath.exp(a))  # noqa: E731
        return -objective.alpha * log_sigmoid(mpmath.log(odds(c)) - mpmath.log(odds(r)))
    if loss_type == "simpo":
        return -log_sigmoid(beta * (c - r) - mpmath.mpf(objective.simpo_gamma))
    if loss_type == "cpo":
        return -log_sigmoid(beta * (c * tc - r * tr))
    if loss_type == "dpo":
        return -log_sigmoid(beta * ((c * tc - rc) - (r * tr - rr)))
    h = (c - rc / tc) - (r - rr / tr)  # ipo: averages
    return (h - 1 / (2 * beta)) ** 2


def reference_loss(loss_type, objective, clips) -> float:
    """Mean over clips of (the mean over the clip's pairs of the pair term) plus the NLL term where there is one."""
    per_clip = []
    for clip in clips:
        c, tc, rc, nll = (mpmath.mpf(clip[k]) for k in ("c", "tc", "rc", "nll"))
        terms = [
            pair_term(loss_type, c, mpmath.mpf(r), tc, mpmath.mpf(tr), rc, mpmath.mpf(rr), objective)
            for r, tr, rr in clip["rejected"]
        ]
        nll_weight = {"orpo": 1, "cpo": objective.cpo_alpha}.get(loss_type, 0)
        per_clip.append(sum(terms) / len(terms) + nll_weight * nll)
    return float(sum(per_clip) / len(per_clip))


def random_clips(rng: random.Random, extreme: bool) -> list[dict]:
    """Per clip: average log-prob and token count of the chosen transcript, its reference sum, NLL, and 1-3 rejected
    (average, count, reference sum). ``extreme``: averages at -1e-8 (a transcript the model is sure of) to -30."""
    averages = [-1e-8, -1e-3, -0.69, -30.0] if extreme else None

    def average():
        return rng.choice(averages) if extreme else -rng.uniform(0.01, 4.0)

    def clip():
        tc = rng.randint(1, 40)
        c = average()
        rejected = []
        for _ in range(rng.randint(1, 3)):
            r, tr = average(), rng.randint(1, 40)
            rejected.append((r, tr, r * tr + rng.uniform(-3, 3)))
        return {"c": c, "tc": tc, "rc": c * tc + rng.uniform(-3, 3), "nll": -c, "rejected": rejected}

    return [clip() for _ in range(rng.randint(2, 5))]


def as_tensors(clips: list[dict]) -> tuple[dict, dict]:
    """The clips as the one-pass forward's outputs and the batch's reference fields (float32, padded slots)."""
    slots = max(len(clip["rejected"]) for clip in clips)

    def padded(index, fill):
        return [[r[index] for r in clip["rejected"]] + [fill] * (slots - len(clip["rejected"])) for clip in clips]

    out = {
        "logps_chosen": torch.tensor([clip["c"] for clip in clips]),
        "logps_rejected": torch.tensor(padded(0, 0.0)),
        "tokens_chosen": torch.tensor([float(clip["tc"]) for clip in clips]),
        "tokens_rejected": torch.tensor(padded(1, 0.0)),
        "rejected_mask": torch.tensor([[k < len(clip["rejected"]) for k in range(slots)] for clip in clips]),
        "nll_chosen": torch.tensor([clip["nll"] for clip in clips]),
    }
    batch = {
        "ref_logps_chosen": torch.tensor([clip["rc"] for clip in clips]),
        "ref_logps_rejected": torch.tensor(padded(2, 0.0)),
    }
    return out, batch


def float32_values(clips: list[dict]) -> list[dict]:
    """The clips with every number rounded to float32, as the implementation sees them."""
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    return [
        {
            "c": f32(clip["c"]),
            "tc": clip["tc"],
            "rc": f32(clip["rc"]),
            "nll": f32(clip["nll"]),
            "rejected": [(f32(r), tr, f32(rr)) for r, tr, rr in clip["rejected"]],
        }
        for clip in clips
    ]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("extreme", [False, True])
def test_every_loss_type_matches_its_formula_in_high_precision(loss_type, extreme):
    seed = random.randrange(10**9)
    rng = random.Random(seed)
    for _ in range(20):
        objective = Objective(loss_type, alpha=rng.uniform(0.05, 1.0), beta=rng.choice([None, rng.uniform(0.05, 3.0)]))
        clips = random_clips(rng, extreme)
        out, batch = as_tensors(clips)
        loss, metrics = objective(out, batch)
        want = reference_loss(loss_type, objective, float32_values(clips))
        assert loss.dtype == torch.float32
        assert math.isfinite(loss.item())
        assert loss.item() == pytest.approx(want, rel=REL, abs=1e-7), (seed, clips)
        assert metrics["loss"].mean().item() == pytest.approx(want, rel=REL, abs=1e-7), seed


@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "dpo", "ipo"])
def test_rewards_accuracies_and_margins_follow_trl(loss_type):
    """rewards = beta * the score each method compares (average or summed log-prob, or its change from the
    reference); accuracy: the chosen reward is the higher; several rejected are averaged per clip."""
    clips = [{"c": -0.5, "tc": 4, "rc": -1.0, "nll": 0.5, "rejected": [(-0.25, 2, -2.0), (-1.5, 2, -1.0)]}]
    out, batch = as_tensors(clips)
    objective = Objective(loss_type, beta=0.2)
    _, metrics = objective(out, batch)
    score_chosen, scores_rejected = {
        "simpo": (-0.5, [-0.25, -1.5]),
        "cpo": (-2.0, [-0.5, -3.0]),
        "dpo": (-2.0 + 1.0, [-0.5 + 2.0, -3.0 + 1.0]),
        "ipo": (-0.5 + 0.25, [-0.25 + 1.0, -1.5 + 0.5]),
    }[loss_type]
    assert metrics["rewards/chosen"].item() == pytest.approx(0.2 * score_chosen)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.2 * sum(scores_rejected) / 2)
    assert metrics["rewards/accuracies"].item() == pytest.approx(sum(score_chosen > s for s in scores_rejected) / 2)
    assert metrics["rewards/margins"].item() == pytest.approx(0.2 * sum(score_chosen - s for s in scores_rejected) / 2)
    assert metrics["nll_loss"].item() == pytest.approx(0.5)


def test_each_method_has_its_papers_default_beta_and_a_name():
    assert Objective("simpo").preference_beta == DEFAULT_BETA["simpo"] == 2.0
    assert all(Objective(name).preference_beta == 0.1 for name in ("cpo", "dpo", "ipo"))
    assert Objective("dpo", beta=0.3).describe() == "DPO (beta 0.3)"
    assert Objective("simpo").describe() == "SimPO (beta 2, gamma 0.5)"
    assert Objective(alpha=0.25).describe() == "ORPO (alpha 0.25)"


def test_reference_objectives_need_the_reference_in_the_batch():
    out, _ = as_tensors([{"c": -1.0, "tc": 3, "rc": 0.0, "nll": 1.0, "rejected": [(-2.0, 3, 0.0)]}])
    with pytest.raises(ValueError, match="needs the reference log-probs"):
        Objective("dpo")(out, {})


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_one_pass_equals_two_pass_for_every_loss_type(loss_type):
    """One encoder pass and one decoder pass serve every objective: the same loss and gradients as Whisper called
    once per transcript, with 1 to 3 rejected transcripts per clip."""
    seed = random.randrange(10**6)
    model = tiny_model(seed % 1000)
    batch, _ = random_batch(seed, slots_per_clip=(2, 4, 3))
    gen = torch.Generator().manual_seed(seed)
    batch["ref_logps_chosen"] = -torch.rand(3, generator=gen) * 50
    batch["ref_logps_rejected"] = -torch.rand(3, 3, generator=gen) * 50
    objective = Objective(loss_type, alpha=0.5, beta=0.3)
    loss, _ = objective(ORPOWhisper(model)(batch), batch)
    loss_ref, _ = objective(two_pass_forward(model, batch, pad_token_id=EOT), batch)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5), seed
    got, want = gradients(model, loss), gradients(model, loss_ref)
    # the whole gradient within 1e-5; a parameter whose gradient is small next to the rest within 1e-4 of its own
    assert_gradients_close(got, want, rel=1e-5, per_parameter_rel=1e-4)
