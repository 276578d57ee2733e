"""The one way transcripts are generated: WER evaluation, make-pairs' n-best lists and the export check use it.

``GenerationMixin.generate`` is called rather than Whisper's own ``generate``: the decoder prefix is
exactly the training prefix (:class:`orpo.data.tokens.WhisperTokens`), per clip, and needs no language
tables in the generation config; and with beam search it returns the real n-best list (Whisper's own
turns ``num_return_sequences`` into copies of each clip). Timestamp tokens can be suppressed altogether
(make-pairs does).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import GenerationMixin

from orpo.scale.launch import unwrap_model
from orpo.scale.zero3 import generation_kwargs


class EvaluationStopped(Exception):
    """A stop signal ended an evaluation between two batches (every process leaves at the same batch)."""


def stop_between_batches(stop: Callable[[], bool] | None) -> None:
    """Raise :class:`EvaluationStopped` when ``stop`` (the loop's all-process stop check) says so."""
    if stop is not None and stop():
        raise EvaluationStopped


def whisper_for_generation(model: torch.nn.Module, accelerator=None) -> torch.nn.Module:
    """The WhisperForConditionalGeneration inside a (DDP/compiled) ORPOWhisper or PEFT wrapper."""
    if accelerator is not None:
        model = unwrap_model(model, accelerator)
    model = getattr(model, "whisper", model)  # ORPOWhisper
    if hasattr(model, "get_base_model"):  # PEFT: adapters stay active in the base model's layers
        model = model.get_base_model()
    return model


def training_modes(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Each submodule's train/eval flag, to put back exactly after evaluating (a module kept in eval stays so)."""
    return [(module, module.training) for module in model.modules()]


def restore_training_modes(modes: list[tuple[torch.nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def generation_config(whisper, tokenizer, num_beams: int = 1, nbest: bool = False, suppress_timestamps: bool = False):
    """Greedy (``num_beams`` 1) or beam search from a given prefix; ``nbest``: every beam with its score;
    ``suppress_timestamps``: no timestamp token anywhere (an n-best list of plain-text hypotheses)."""
    config = copy.deepcopy(whisper.generation_config)
    for name in ("forced_decoder_ids", "language", "task", "return_timestamps"):  # the prefix is given instead
        if hasattr(config, name):
            setattr(config, name, None)
    if suppress_timestamps:
        first_timestamp = tokenizer.convert_tokens_to_ids("<|0.00|>")
        vocab = whisper.config.vocab_size
        suppress = list(config.suppress_tokens or [])
        if isinstance(first_timestamp, int) and first_timestamp < vocab:
            suppress += list(range(first_timestamp, vocab))
        config.suppress_tokens = sorted(set(suppress))
    config.num_beams = num_beams
    config.do_sample = False
    config.use_cache = True
    config.max_new_tokens = None
    if nbest:
        config.num_return_sequences = num_beams
        config.return_dict_in_generate = True
        config.output_scores = True
    return config


def generate(whisper, features: torch.Tensor, prefix: torch.Tensor, config, max_length: int, accelerator=None):
    """Sequences (prefix included) for a batch of log-mel ``features`` from the decoder ``prefix`` (B, P).

    ``max_length`` counts the prefix, as Whisper's ``generation_max_length`` does, and is capped at the
    model's ``max_target_positions``. Under multi-process ZeRO-3 every rank keeps stepping until all are done.
    """
    device = next(whisper.parameters()).device
    features = features.to(device=device, dtype=whisper.get_encoder().conv1.weight.dtype)
    prefix = prefix.to(device)
    config.max_length = max(min(max_length, whisper.config.max_target_positions), prefix.shape[1] + 1)
    return GenerationMixin.generate(
        whisper,
        input_features=features,
        # All frames are real input (Whisper pads audio to 30 s itself); the mask only tells generate that
        # the batch needs no padding mask.
        attention_mask=torch.ones(features.shape[0], features.shape[-1], dtype=torch.long, device=device),
        decoder_input_ids=prefix,
        generation_config=config,
        **generation_kwargs(accelerator),
    )


def generate_transcripts(
    model: torch.nn.Module,
    loader,
    accelerator,
    tokenizer,
    num_beams: int = 1,
    max_length: int = 225,
    desc: str = "generate",
    stop: Callable[[], bool] | None = None,
) -> dict[int, str]:
    """Transcribe every clip of ``loader`` (a prepared loader of :class:`orpo.data.collate.GenerationCollator`
    batches); ``{index: text}``. ``stop``, checked before each batch, ends it with :class:`EvaluationStopped`.

    Each process generates its shard; the texts are gathered so every process returns the same full
    mapping. Duplicates that even batches add are dropped by index.
    """
    from accelerate.utils import gather_object

    whisper = whisper_for_generation(model, accelerator)
    modes = training_modes(whisper)
    whisper.eval()
    config = generation_config(whisper, tokenizer, num_beams)
    local: list[tuple[int, str]] = []
    disable = accelerator is not None and not accelerator.is_local_main_process
    device = next(whisper.parameters()).device
    autocast = accelerator.autocast() if accelerator is not None else torch.autocast(device.type, enabled=False)
    try:
        with torch.no_grad(), autocast:
            for batch in tqdm(loader, desc=desc, leave=False, disable=disable):
                stop_between_batches(stop)
                prefix = batch["decoder_input_ids"]
                sequences = generate(whisper, batch["input_features"], prefix, config, max_length, accelerator)
                if not isinstance(sequences, torch.Tensor):
                    sequences = sequences.sequences
                texts = tokenizer.batch_decode(sequences[:, prefix.shape[1] :], skip_special_tokens=True)
                local += [(int(i), t.strip()) for i, t in zip(batch["sample_index"].tolist(), texts)]
    finally:
        restore_training_modes(modes)
    gathered = gather_object(local) if accelerator is not None and accelerator.num_processes > 1 else local
    return dict(sorted(gathered))
