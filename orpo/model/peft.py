"""PEFT adapters: LoRA and AdaLoRA on Whisper, and what the training loop must do for them.

The loop never asks which method runs: it calls an :class:`AdapterHooks` (from :func:`adapter_hooks`) at
three points. Only AdaLoRA needs any of them: its orthogonal penalty in the loss, its rank allocation
after each optimizer step, and its allocator state in checkpoints.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from orpo.config import TrainConfig
from orpo.errors import ConfigError
from orpo.scale.zero3 import param_numel, peft_model_kwargs

logger = logging.getLogger(__name__)


def apply_peft(whisper, cfg: TrainConfig, total_steps: int):
    """Wrap the model with LoRA or AdaLoRA adapters; return it unchanged for ``peft: none``."""
    if cfg.peft == "none":
        return whisper
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    common = {"lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "target_modules": cfg.lora_target_modules}
    if cfg.peft == "lora":
        peft_config = LoraConfig(r=cfg.lora_r, bias="none", **common)
    else:
        target_r = cfg.adalora_target_r if cfg.adalora_target_r is not None else max(1, cfg.lora_r // 4)
        tinit = cfg.adalora_tinit if cfg.adalora_tinit is not None else min(total_steps // 10, 200)
        tfinal = cfg.adalora_tfinal if cfg.adalora_tfinal is not None else min(total_steps // 5, 500)
        if target_r > cfg.lora_r:
            raise ConfigError(f"adalora_target_r ({target_r}) must not exceed lora_r ({cfg.lora_r}), the initial rank")
        if tinit >= total_steps - tfinal:
            raise ConfigError(
                f"AdaLoRA needs steps to shrink ranks in: adalora_tinit ({tinit}) must be below "
                f"the optimizer steps ({total_steps}) minus adalora_tfinal ({tfinal})"
            )
        peft_config = AdaLoraConfig(
            init_r=cfg.lora_r, target_r=target_r, total_step=total_steps, tinit=tinit, tfinal=tfinal, **common
        )
    whisper = get_peft_model(whisper, peft_config, **peft_model_kwargs())
    trainable = sum(param_numel(p) for p in whisper.parameters() if p.requires_grad)
    total = sum(param_numel(p) for p in whisper.parameters())
    logger.info(
        "%s adapters: %d trainable of %d parameters (%.2f%%)", cfg.peft, trainable, total, 100 * trainable / total
    )
    return whisper


def adapter_disabled(whisper):
    """A context in which a PEFT model computes as its base model (the adapters switched off): the reference
    model of DPO and IPO at no extra memory. For a model without adapters, a context that changes nothing."""
    return whisper.disable_adapter() if hasattr(whisper, "disable_adapter") else contextlib.nullcontext()


def adalora_orthogonal_penalty(whisper) -> torch.Tensor | None:
    """AdaLoRA's orthogonal regularisation, ``orth_reg_weight * mean ||P Pᵀ - I||_F`` over its A and B matrices.

    PEFT adds this in ``AdaLoraModel.forward`` (peft/tuners/adalora/model.py). ORPOWhisper calls the encoder and
    decoder directly and never goes through that forward, so the trainer adds it to the loss itself. None when
    the weight is 0.
    """
    adalora = whisper.base_model
    adapter = adalora.trainable_adapter_name
    weight = adalora.peft_config[adapter].orth_reg_weight
    if weight <= 0:
        return None
    terms = []
    for name, p in adalora.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            covariance = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(*covariance.shape, dtype=covariance.dtype, device=covariance.device)
            terms.append(torch.linalg.matrix_norm(covariance - eye, ord="fro"))
    if not terms:
        return None
    return weight * torch.stack(terms).mean()


class AdaLoraState:
    """AdaLoRA's rank-allocation state that lives outside the weights, kept in checkpoints (as safetensors and JSON).

    The importance averages of the rank allocator and the rank pattern decide which ranks are pruned next; the
    masked singular values themselves are weights (``lora_E``) and travel with the adapter.
    """

    def __init__(self, whisper):
        self.adalora = whisper.base_model

    def _config(self):
        return self.adalora.peft_config[self.adalora.trainable_adapter_name]

    def state_dict(self) -> dict:
        allocator = self.adalora.rankallocator
        cpu = lambda d: {name: t.detach().cpu() for name, t in d.items()}  # noqa: E731
        return {
            "ipt": cpu(allocator.ipt),
            "exp_avg_ipt": cpu(allocator.exp_avg_ipt),
            "exp_avg_unc": cpu(allocator.exp_avg_unc),
            "rank_pattern": self._config().rank_pattern,
        }

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.adalora.model.named_parameters())
        allocator = self.adalora.rankallocator
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {name: t.to(params[name].device) for name, t in state[key].items()})
        self._config().rank_pattern = state["rank_pattern"]


def adalora_ranks(whisper) -> dict[str, int]:
    """Current rank of each AdaLoRA module: singular values not pruned (all of them before the first pruning)."""
    pattern = whisper.base_model.peft_config[whisper.base_model.trainable_adapter_name].rank_pattern
    if pattern:
        return {name: int(sum(bool(v) for v in mask)) for name, mask in pattern.items()}
    return {name: int(p.shape[0]) for name, p in whisper.base_model.model.named_parameters() if "lora_E" in name}


class AdapterHooks:
    """The loop's calls for adapters that need nothing (no adapters, LoRA)."""

    def checkpoint_objects(self) -> dict:
        """State outside the weights that checkpoints must keep: name (of its files) to an object with
        ``state_dict``/``load_state_dict``."""
        return {}

    def regularise(self, loss: torch.Tensor, per_clip: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss with the method's own terms added (logged per clip in ``per_clip``)."""
        return loss

    def after_optimizer_step(self, global_step: int) -> None:
        """Called after each optimizer step that was taken, before the gradients are cleared."""


class AdaLoraHooks(AdapterHooks):
    """AdaLoRA: orthogonal penalty, rank allocation every optimizer step (peft #432), allocator state saved."""

    def __init__(self, whisper):
        self.whisper = whisper

    def checkpoint_objects(self) -> dict:
        return {"adalora_state": AdaLoraState(self.whisper)}

    def regularise(self, loss: torch.Tensor, per_clip: dict[str, torch.Tensor]) -> torch.Tensor:
        penalty = adalora_orthogonal_penalty(self.whisper)
        if penalty is None:
            return loss
        per_clip["adalora_orth_reg"] = penalty.detach().expand_as(per_clip["loss"])
        return loss + penalty

    def after_optimizer_step(self, global_step: int) -> None:
        # after optimizer.step(), before zero_grad(): it reads the gradients
        self.whisper.base_model.update_and_allocate(global_step)


def adapter_hooks(whisper, cfg: TrainConfig) -> AdapterHooks:
    """The hooks of ``cfg.peft`` for ``whisper`` (the unwrapped PEFT model, or the plain one)."""
    return AdaLoraHooks(whisper) if cfg.peft == "adalora" else AdapterHooks()
