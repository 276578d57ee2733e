"""Whisper with a one-pass preference forward: the encoder once per clip, one decoder pass over all transcripts.

It returns what every objective of :mod:`orpo.loss` is computed from (the name keeps the first of them).

The collator packs a clip's chosen and rejected transcripts into one decoder row (block-causal
attention, positions restarting per segment), so cross-attention keys and values are computed once
per clip. Log-probabilities are computed over the vocabulary in chunks, recomputed in backward, so
full float32 logits never exist for the whole batch.

Which tokens count (labels are the decoder inputs shifted left; logit k scores label k):

* every preference term uses the log-prob of the transcript tokens only (their average, or their sum
  for ``cpo`` and ``dpo``): the text and ``<|endoftext|>``. The prefix ``<|lang|><|task|><|notimestamps|>``
  is the same for chosen and rejected and would only dilute the contrast; ``<|startoftranscript|>`` is never a label.
* the NLL is the mean negative log-prob of the chosen transcript's tokens: with
  ``disable_prompt_loss: true`` (the default) the same transcript tokens, with ``false`` the prefix
  tokens after ``<|startoftranscript|>`` as well.

:func:`orpo.model.reference.two_pass_forward` is the plain reference the tests and the benchmark
compare against.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from orpo.data.collate import IGNORE_INDEX
from orpo.model.attention import TOKEN_MAJOR_SDPA, token_major_attention
from orpo.model.recompute import elementwise_modules, report_kept, selective_recompute

LOGIT_CHUNK_TOKENS = 512


def whisper_base(whisper: nn.Module) -> nn.Module:
    """The WhisperForConditionalGeneration itself, PEFT-wrapped or not."""
    return whisper.get_base_model() if hasattr(whisper, "get_base_model") else whisper


def whisper_parts(whisper: nn.Module) -> tuple[nn.Module, nn.Module, nn.Linear]:
    """(encoder, decoder, proj_out) of a WhisperForConditionalGeneration, PEFT-wrapped or not."""
    base = whisper_base(whisper)
    return base.model.encoder, base.model.decoder, base.proj_out


def spec_augment(whisper_model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Whisper's SpecAugment, which calling the encoder directly would skip: in training mode with
    ``config.apply_spec_augment`` on, time and feature masks as the ``mask_*`` config keys say.

    The masks are drawn before the encoder's one pass, so all transcripts of a clip see the same
    masked clip. ``WhisperModel._mask_input_features`` is called (private, and only here) so the
    masks are Whisper's own. It draws them from numpy's global RNG: that is seeded from torch's,
    which the training loop seeds per batch, so a resumed run masks what the uninterrupted one did;
    numpy's state is then restored.
    """
    if not (whisper_model.training and whisper_model.config.apply_spec_augment):
        return features
    seed = int(torch.randint(2**32, ()))
    numpy_state = np.random.get_state()
    try:
        np.random.seed(seed)
        return whisper_model._mask_input_features(features.clone())  # it masks in place; the batch stays as given
    finally:
        np.random.set_state(numpy_state)


def freeze_encoder(whisper: nn.Module) -> None:
    """Stop training the encoder (adapters in it included); :class:`ORPOWhisper` then runs it without grad."""
    encoder, _, _ = whisper_parts(whisper)
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _chunk_token_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = at_least_float32(head(hidden))
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = LOGIT_CHUNK_TOKENS
) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` (N, D) under the output head, in float32 or better,
    ``chunk_tokens`` rows at a time.

    In training each chunk is checkpointed: backward recomputes its logits instead of keeping them.
    The head is called as a module (never its weight read directly), so DeepSpeed ZeRO-3 gathers its
    partitioned weight for the forward and again for the recomputation.
    """
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (head, hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        if torch.is_grad_enabled():
            report_kept(args[1])
            pieces.append(checkpoint(_chunk_token_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logprobs(*args))
    return torch.cat(pieces)


def block_causal_mask(segment_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) mask: token i sees token j when both are in the same segment and j <= i."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    if attn_implementation in ("sdpa", TOKEN_MAJOR_SDPA):
        return allowed[:, None]
    if attn_implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    raise ValueError(
        f"attention implementation {attn_implementation!r} cannot take the block-causal mask of packed "
        "transcripts; load the model with attn_implementation='sdpa' or 'eager'"
    )


def segment_statistics(token_logps: torch.Tensor, batch: dict, disable_prompt_loss: bool) -> dict[str, torch.Tensor]:
    """Per-clip average log-probs of each transcript, their token counts (an objective on summed log-probs
    multiplies the two) and the chosen NLL, from (B, L) token log-probs.

    ``token_logps`` holds log p(label) at every labelled position of the packed rows (0 elsewhere).
    """
    segment_ids, labels = batch["segment_ids"], batch["labels"]
    transcript, num_segments = batch["transcript_mask"], batch["num_segments"]
    slots = int(num_segments.max())
    in_slot = segment_ids[..., None] == torch.arange(slots, device=segment_ids.device)
    counted = (in_slot & transcript[..., None]).to(token_logps.dtype)
    tokens = counted.sum(dim=1)
    average = (token_logps[..., None] * counted).sum(dim=1) / tokens.clamp(min=1)

    scored = (labels != IGNORE_INDEX) & (segment_ids == 0)
    if disable_prompt_loss:
        scored &= transcript
    scored = scored.to(token_logps.dtype)
    nll = -(token_logps * scored).sum(dim=1) / scored.sum(dim=1).clamp(min=1)

    rejected_slots = torch.arange(slots - 1, device=segment_ids.device)
    return {
        "logps_chosen": average[:, 0],
        "logps_rejected": average[:, 1:],
        "rejected_mask": rejected_slots[None, :] < (num_segments[:, None] - 1),
        "nll_chosen": nll,
        "tokens_chosen": tokens[:, 0],
        "tokens_rejected": tokens[:, 1:],
    }


class ORPOWhisper(nn.Module):
    """Wraps a Whisper model (plain or PEFT) so that one ``forward`` is one ORPO forward.

    Keeping the whole computation inside this module lets Accelerate, DDP and DeepSpeed wrap one
    module and see every parameter use.
    """

    def __init__(
        self,
        whisper: nn.Module,
        disable_prompt_loss: bool = True,
        selective_recompute: bool = False,
        logit_chunk_tokens: int = LOGIT_CHUNK_TOKENS,
        log_mel: nn.Module | None = None,
    ):
        super().__init__()
        self.whisper = whisper
        self.log_mel = log_mel  # with features_on_device: batches bring waveforms, features are computed here
        self.disable_prompt_loss = disable_prompt_loss
        self.selective_recompute = selective_recompute
        self.logit_chunk_tokens = logit_chunk_tokens

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(token_major_attention(self.whisper))
            if self.selective_recompute and torch.is_grad_enabled():
                stack.enter_context(selective_recompute(elementwise_modules(self.whisper)))
            return self._forward(batch)

    def input_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The encoder's input of a batch: its log-mel features, or (``input_audio``, with ``features_on_device``)
        those of its waveforms, computed here on the model's device."""
        if "input_audio" not in batch:
            return batch["input_features"]
        if self.log_mel is None:
            raise ValueError("the batch holds waveforms (input_audio) but the model has no LogMel to featurise them")
        return self.log_mel(batch["input_audio"])

    def _forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoder, decoder, proj_out = whisper_parts(self.whisper)
        features = self.input_features(batch).to(encoder.conv1.weight.dtype)
        features = spec_augment(whisper_base(self.whisper).model, features)
        # A frozen encoder (nothing in it trains) keeps no activations for backward.
        encoder_trains = any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
            encoder_states = encoder(features).last_hidden_state

        attn = decoder.config._attn_implementation
        mask = block_causal_mask(batch["segment_ids"], attn, encoder_states.dtype)
        hidden = decoder(
            input_ids=batch["decoder_input_ids"],
            attention_mask=mask,
            position_ids=batch["position_ids"],
            encoder_hidden_states=encoder_states,
            use_cache=False,
        ).last_hidden_state

        labels = batch["labels"]
        labelled = labels != IGNORE_INDEX
        logps = token_logprobs(proj_out, hidden[labelled], labels[labelled], self.logit_chunk_tokens)
        token_logps = torch.zeros(labels.shape, dtype=logps.dtype, device=logps.device)
        token_logps[labelled] = logps
        return segment_statistics(token_logps, batch, self.disable_prompt_loss)
