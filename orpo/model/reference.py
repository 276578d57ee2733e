"""The plain reference ORPO forward: Whisper called once per transcript, full logits and log-softmax.

Same outputs as :class:`orpo.model.orpo_whisper.ORPOWhisper` at several times the memory; the tests check
the one-pass forward against it, and ``bench/`` measures both side by side.
"""

from __future__ import annotations

import torch
from torch import nn

from orpo.data.collate import IGNORE_INDEX
from orpo.model.orpo_whisper import at_least_float32, segment_statistics


def _unpack_slot(batch: dict, slot: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoder inputs, labels and transcript mask (B, L_slot) of one transcript slot, batched alone."""
    rows = batch["segment_ids"] == slot
    lengths = rows.sum(dim=1)
    width = max(int(lengths.max()), 1)
    batch_size = rows.shape[0]
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long, device=rows.device)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long, device=rows.device)
    transcript = torch.zeros((batch_size, width), dtype=torch.bool, device=rows.device)
    for b in range(batch_size):
        n = int(lengths[b])
        input_ids[b, :n] = batch["decoder_input_ids"][b][rows[b]]
        labels[b, :n] = batch["labels"][b][rows[b]]
        transcript[b, :n] = batch["transcript_mask"][b][rows[b]]
    return input_ids, labels, transcript


def two_pass_forward(
    whisper: nn.Module, batch: dict, disable_prompt_loss: bool = True, pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """Reference ORPO forward: Whisper called separately for the chosen and for each rejected slot.

    The encoder runs once per call, logits and log-softmax are materialised in full. Same outputs as
    :class:`ORPOWhisper`, at several times the memory.
    """
    slots = int(batch["num_segments"].max())
    token_logps, segment_ids, labels_all, transcript_all = [], [], [], []
    for slot in range(slots):
        input_ids, labels, transcript = _unpack_slot(batch, slot, pad_token_id)
        logits = whisper(input_features=batch["input_features"], decoder_input_ids=input_ids, use_cache=False).logits
        logp = (
            torch.log_softmax(at_least_float32(logits), dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        )
        labelled = labels != IGNORE_INDEX
        token_logps.append(logp * labelled)
        segment_ids.append(torch.where(labelled, slot, -1))
        labels_all.append(labels)
        transcript_all.append(transcript)
    unpacked = {
        "segment_ids": torch.cat(segment_ids, dim=1),
        "labels": torch.cat(labels_all, dim=1),
        "transcript_mask": torch.cat(transcript_all, dim=1),
        "num_segments": batch["num_segments"],
    }
    return segment_statistics(torch.cat(token_logps, dim=1), unpacked, disable_prompt_loss)
