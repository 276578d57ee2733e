"""The recipe's objective (``loss_type`` and its weights) applied to what the one-pass forward returns.

Every objective is computed from the same outputs of :class:`orpo.model.orpo_whisper.ORPOWhisper`: per clip the
average log-prob of each transcript over its transcript tokens, the token counts (a summed log-prob is the
average times the count) and the chosen NLL. One encoder pass and one decoder pass serve every objective.

=========  ========================  =========================  =====================
loss_type  log-probs compared        reference model            NLL in the loss
=========  ========================  =========================  =====================
orpo       average                   none                       yes (``alpha`` weighs the odds ratio)
simpo      average                   none                       no
cpo        summed                    none                       yes (``cpo_alpha``)
dpo        summed                    yes                        no
ipo        average                   yes                        no
=========  ========================  =========================  =====================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orpo.loss.cpo import cpo_loss
from orpo.loss.dpo import dpo_loss, ipo_loss
from orpo.loss.orpo import ORPO_METRIC_NAMES, orpo_loss
from orpo.loss.pairs import METRIC_NAMES
from orpo.loss.simpo import simpo_loss

LOSS_TYPES = ("orpo", "simpo", "cpo", "dpo", "ipo")
REFERENCE_LOSS_TYPES = ("dpo", "ipo")
# beta when the recipe leaves it unset: SimPO's paper (2.0; its runs used 2.0 to 2.5), TRL's 0.1 for the others
DEFAULT_BETA = {"simpo": 2.0, "cpo": 0.1, "dpo": 0.1, "ipo": 0.1}
DISPLAY_NAMES = {"orpo": "ORPO", "simpo": "SimPO", "cpo": "CPO", "dpo": "DPO", "ipo": "IPO"}


@dataclass(frozen=True)
class Objective:
    """One preference objective with its weights; called on a forward's outputs and the batch (which carries the
    reference log-probs for DPO and IPO), it returns the scalar loss and per-clip metrics."""

    loss_type: str = "orpo"
    alpha: float = 0.1
    beta: float | None = None
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        return cls(cfg.loss_type, cfg.alpha, cfg.beta, cfg.simpo_gamma, cfg.cpo_alpha)

    @property
    def needs_reference(self) -> bool:
        return self.loss_type in REFERENCE_LOSS_TYPES

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ORPO_METRIC_NAMES if self.loss_type == "orpo" else METRIC_NAMES

    @property
    def preference_beta(self) -> float:
        return DEFAULT_BETA[self.loss_type] if self.beta is None else self.beta

    def describe(self) -> str:
        """The objective and its weights, as a table row names it: "ORPO (alpha 0.1)", "SimPO (beta 2, gamma 0.5)"."""
        if self.loss_type == "orpo":
            return f"ORPO (alpha {self.alpha:g})"
        weights = f"beta {self.preference_beta:g}"
        if self.loss_type == "simpo":
            weights += f", gamma {self.simpo_gamma:g}"
        if self.loss_type == "cpo":
            weights += f", cpo_alpha {self.cpo_alpha:g}"
        return f"{DISPLAY_NAMES[self.loss_type]} ({weights})"

    def __call__(self, out: dict, batch: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask, nll = out["rejected_mask"], out["nll_chosen"]
        average_chosen, average_rejected = out["logps_chosen"], out["logps_rejected"]
        if self.loss_type == "orpo":
            return orpo_loss(average_chosen, average_rejected, mask, nll, self.alpha)
        beta = self.preference_beta
        if self.loss_type == "simpo":
            return simpo_loss(average_chosen, average_rejected, mask, nll, beta, self.simpo_gamma)
        tokens_chosen, tokens_rejected = out["tokens_chosen"].clamp(min=1), out["tokens_rejected"].clamp(min=1)
        sum_chosen, sum_rejected = average_chosen * tokens_chosen, average_rejected * tokens_rejected
        if self.loss_type == "cpo":
            return cpo_loss(sum_chosen, sum_rejected, mask, nll, beta, self.cpo_alpha)
        if batch is None or "ref_logps_chosen" not in batch:
            raise ValueError(f"loss_type {self.loss_type} needs the reference log-probs in the batch")
        ref_chosen, ref_rejected = batch["ref_logps_chosen"], batch["ref_logps_rejected"]  # summed
        if self.loss_type == "dpo":
            return dpo_loss(sum_chosen, sum_rejected, ref_chosen, ref_rejected, mask, nll, beta)
        return ipo_loss(
            average_chosen,
            average_rejected,
            ref_chosen / tokens_chosen,
            ref_rejected / tokens_rejected,
            mask,
            nll,
            beta,
        )
