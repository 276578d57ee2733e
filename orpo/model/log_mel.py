"""Whisper's log-mel spectrogram computed on the accelerator, in the training step (``features_on_device``).

The data loader then only decodes (and augments) audio: the collator hands raw 16 kHz waveforms padded to Whisper's
30 s window, and this module turns a batch of them into the encoder's input where the model is. It computes what
``WhisperFeatureExtractor`` computes (its torch path, batched): a Hann-windowed STFT (``n_fft`` 400, hop 160),
the power spectrum without its last frame, Whisper's mel filters (taken from the feature extractor itself: 80 or
128 bins), ``log10`` clamped at 1e-10, each clip floored at its own maximum minus 8, then ``(x + 4) / 4``.
``tests/test_log_mel.py`` checks it against the feature extractor on real speech within 1e-4.
"""

from __future__ import annotations

import torch
from torch import nn


class LogMel(nn.Module):
    """(B, samples) float waveforms at 16 kHz -> (B, mel bins, frames) Whisper input features, float32."""

    def __init__(self, feature_extractor):
        super().__init__()
        self.n_fft = feature_extractor.n_fft
        self.hop_length = feature_extractor.hop_length
        self.n_samples = feature_extractor.n_samples
        # not persistent: the filters come from the processor, never from (or into) a checkpoint's weights
        filters = torch.as_tensor(feature_extractor.mel_filters, dtype=torch.float32).T.contiguous()
        self.register_buffer("mel_filters", filters, persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        if waveforms.shape[-1] != self.n_samples:
            raise ValueError(f"waveforms of {waveforms.shape[-1]} samples; Whisper's window is {self.n_samples}")
        with torch.autocast(waveforms.device.type, enabled=False):  # the spectrum in float32 whatever the step's
            # the buffers in float32 too: a DeepSpeed that casts the whole module to bf16 casts them as well
            window, filters = self.window.float(), self.mel_filters.float()
            stft = torch.stft(waveforms.float(), self.n_fft, self.hop_length, window=window, return_complex=True)
            power = stft[..., :-1].abs() ** 2
            log_spec = torch.clamp(filters @ power, min=1e-10).log10()
            floor = log_spec.amax(dim=(1, 2), keepdim=True) - 8.0
            return (torch.maximum(log_spec, floor) + 4.0) / 4.0
