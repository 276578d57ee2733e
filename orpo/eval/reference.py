"""Reference log-probs for the objectives measured against a reference model (DPO, IPO): the summed log-prob of
each transcript of a clip under the base model, computed once per pair, never per epoch.

The reference is the network being trained as it was before training, at no second copy: with LoRA or AdaLoRA
the same network with its adapters switched off (so it can be computed at any time, also for the pairs a refresh
makes in mid-run), for a full fine-tune the model before its first optimizer step. It runs the one-pass forward
in eval mode (no dropout, no SpecAugment) on the clip's clean audio (no augmentation), without grad, under the
run's autocast: one pass per clip.
"""

from __future__ import annotations

import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from orpo.data.collate import PreferenceCollator
from orpo.eval.generate import restore_training_modes, training_modes
from orpo.model.peft import adapter_disabled
from orpo.scale.launch import unwrap_model
from orpo.scale.shards import process_share


def summed_logps(out: dict[str, torch.Tensor], num_segments: torch.Tensor) -> list[list[float]]:
    """Per clip of a forward's outputs: the summed log-prob of its chosen transcript, then of each rejected one."""
    chosen = (out["logps_chosen"] * out["tokens_chosen"]).tolist()
    rejected = (out["logps_rejected"] * out["tokens_rejected"]).tolist()
    return [[c] + r[: int(n) - 1] for c, r, n in zip(chosen, rejected, num_segments.tolist())]


def reference_logps(
    model: torch.nn.Module, dataset, indices: list[int], accelerator, batch_size: int, desc: str = "reference"
) -> dict[int, list[float]]:
    """``{clip: [chosen, rejected...]}`` summed log-probs under the reference model for the clips ``indices`` of a
    :class:`orpo.data.dataset.PreferenceDataset`; ``model`` is the (prepared or not) one-pass model. Each process
    scores its share; every process returns all of them."""
    one_pass = unwrap_model(model, accelerator)
    clean = dataset.without_augmentation()
    share = process_share(indices, accelerator)
    collator = PreferenceCollator(pad_token_id=dataset.tokens.eot)
    loader = DataLoader(Subset(clean, share), batch_size=batch_size, shuffle=False, collate_fn=collator)
    modes = training_modes(one_pass)
    one_pass.eval()
    local = {}
    try:
        with torch.no_grad(), adapter_disabled(one_pass.whisper), accelerator.autocast():
            for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
                batch = {name: value.to(accelerator.device) for name, value in batch.items()}
                rows = summed_logps(one_pass(batch), batch["num_segments"])
                local.update(zip(batch["sample_index"].tolist(), rows))
    finally:
        restore_training_modes(modes)
    gathered = gather_object(list(local.items())) if accelerator.num_processes > 1 else list(local.items())
    return dict(gathered)
