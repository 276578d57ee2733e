"""Scaled-dot-product attention laid out token-major, so one copy of its output serves two backward passes.

Hugging Face's SDPA path makes queries, keys and values contiguous as (batch, heads, tokens, dim), so
the attention output comes out in that layout too and has to be copied into (batch, tokens, heads·dim)
for the output projection. Both copies are kept for backward: the attention kernel keeps its output,
the projection keeps its input. Here queries, keys and values are handed to the same kernel as
(batch, heads, tokens, dim) views of token-major storage; the kernel then writes its output token-major
as well, the copy becomes a no-op, and both backward passes share one tensor. Same kernel, same
numbers, one activation-sized tensor less per attention layer.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

TOKEN_MAJOR_SDPA = "sdpa_token_major"


def _token_major(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def token_major_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    return sdpa_attention_forward(
        module, _token_major(query), _token_major(key), _token_major(value), attention_mask, **kwargs
    )


AttentionInterface.register(TOKEN_MAJOR_SDPA, token_major_sdpa_forward)
AttentionMaskInterface.register(TOKEN_MAJOR_SDPA, sdpa_mask)


@contextlib.contextmanager
def token_major_attention(whisper) -> Iterator[None]:
    """Within the block, a Whisper model that uses SDPA runs the token-major variant (others are left alone)."""
    config = whisper.config
    previous = config._attn_implementation
    if previous == "sdpa":
        config._attn_implementation = TOKEN_MAJOR_SDPA
    try:
        yield
    finally:
        config._attn_implementation = previous
