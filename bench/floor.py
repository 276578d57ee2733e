"""What an ORPO step must cost at the least, counted from the model's shape: activation bytes and FLOPs.

An independent count beside the measurements of ``bench/step.py`` (hooks and a clock): a reader sees how
far a measured step is from what its shape requires.

**Activation floor** of the one-pass step without recomputation: what backward needs of one encoder pass
per clip, one decoder pass over the packed transcripts, and cross-attention keys and values once per clip.
Per position, in the activation dtype (d = d_model, f = ffn width):

* encoder layer (1500 positions): LayerNorm inputs and outputs (4d), queries, keys and values (3d), the
  attention output, shared by the kernel and the output projection (d), the fc1 output and the GELU output
  (2f): 8d + 2f;
* decoder layer: the same with a third LayerNorm and the cross-attention queries and output: 12d + 2f, and
  per clip the cross-attention keys and values (2d × 1500);
* the convolutions (two outputs at 3000 frames, one at 1500), the encoder's final LayerNorm (input, and its
  output, which every cross-attention projection reads), the decoder's final LayerNorm and the labelled
  hidden states the chunked head recomputes from (3d per decoder position);
* in float32 whatever the dtype: two statistics per LayerNorm and position, one log-sum-exp per head and
  attention.

Not counted: integer indices, the boolean block mask (L² bytes per clip) and the head's per-chunk results.
A decoder row holds, per transcript, its text, ``<|endoftext|>`` and the 4-token prefix, less the one shift.

**FLOPs**: matrix products (2 per multiply-add) of the forward, encoder + decoder + head, and the step as
forward + backward: 3× the forward of what trains, 1× of a frozen encoder, one more forward of
checkpointed layers and of the chunked head (recomputed in backward).
"""

from __future__ import annotations

from dataclasses import dataclass

ENCODER_POSITIONS = 1500
MEL_FRAMES = 3000
PREFIX_TOKENS = 4


@dataclass(frozen=True)
class Shape:
    """The dimensions of a Whisper model that set its cost."""

    d_model: int
    layers: int
    heads: int
    ffn: int
    mels: int
    vocab: int


@dataclass(frozen=True)
class Step:
    """One ORPO step's inputs: clips, and per clip the decoder positions of each transcript."""

    clips: int
    transcript_positions: tuple[int, ...]  # chosen first, then each rejected

    @classmethod
    def of(cls, clips: int, chosen_tokens: int, rejected_tokens: list[int]) -> Step:
        # a transcript of n text tokens is prefix + text + <|endoftext|>, shifted by one: n + 4 positions
        return cls(clips, tuple(n + PREFIX_TOKENS for n in [chosen_tokens, *rejected_tokens]))

    @property
    def decoder_positions(self) -> int:
        return sum(self.transcript_positions)


def activation_floor_bytes(shape: Shape, step: Step, dtype_bytes: int) -> int:
    """Bytes the one-pass step's backward needs, as the module docstring counts them."""
    d, f, h = shape.d_model, shape.ffn, shape.heads
    t, p = ENCODER_POSITIONS, step.decoder_positions
    encoder = shape.layers * t * (8 * d + 2 * f) + MEL_FRAMES * 2 * d + t * d + t * 2 * d
    encoder_fp32 = shape.layers * t * (2 * 2 + h) + t * 2
    cross_keys_values = shape.layers * t * 2 * d
    decoder = shape.layers * p * (12 * d + 2 * f) + p * 3 * d
    decoder_fp32 = shape.layers * p * (3 * 2 + 2 * h) + p * 2
    per_clip = (encoder + cross_keys_values + decoder) * dtype_bytes + (encoder_fp32 + decoder_fp32) * 4
    return step.clips * per_clip


def encoder_flops(shape: Shape) -> int:
    """Forward FLOPs of one encoder pass over one 30 s clip."""
    d, t = shape.d_model, ENCODER_POSITIONS
    convolutions = 2 * MEL_FRAMES * 3 * shape.mels * d + 2 * t * 3 * d * d
    per_layer = 2 * t * (4 * d * d + 2 * d * shape.ffn) + 4 * t * t * d
    return convolutions + shape.layers * per_layer


def decoder_flops(shape: Shape, transcript_positions: tuple[int, ...]) -> int:
    """Forward FLOPs of the decoder layers over one clip's transcripts, cross-attention keys and values
    excluded (they depend on the encoder passes, not on the transcripts)."""
    d, t = shape.d_model, ENCODER_POSITIONS
    positions = sum(transcript_positions)
    causal_pairs = sum(n * (n + 1) // 2 for n in transcript_positions)  # each transcript attends to itself
    per_layer = positions * (2 * 6 * d * d + 2 * 2 * d * shape.ffn + 4 * t * d) + 4 * causal_pairs * d
    return shape.layers * per_layer


def cross_keys_values_flops(shape: Shape) -> int:
    """Forward FLOPs of the cross-attention keys and values of one encoder output, all layers."""
    return shape.layers * 2 * ENCODER_POSITIONS * 2 * shape.d_model**2


def step_flops(shape: Shape, step: Step, variant: str) -> int:
    """FLOPs of one training step (forward and backward) of a ``bench/step.py`` variant."""
    two_pass = variant.startswith("two-pass")
    encoder_passes = len(step.transcript_positions) if two_pass else 1
    encoder = encoder_passes * encoder_flops(shape)
    cross = encoder_passes * cross_keys_values_flops(shape)
    decoder = decoder_flops(shape, step.transcript_positions)
    head = step.decoder_positions * 2 * shape.d_model * shape.vocab
    layer_factor = 4 if variant.endswith("checkpointing") else 3
    encoder_factor = 1 if variant.endswith("freeze_encoder") else layer_factor
    head_factor = 3 if two_pass else 4  # the one-pass head is recomputed in backward, chunk by chunk
    return step.clips * (encoder_factor * encoder + layer_factor * (cross + decoder) + head_factor * head)
