"""SpecAugment (``config.apply_spec_augment``) in the one-pass forward: Whisper's masks, per clip, in
training only, the same for the same torch seed, and nothing changed when it is off."""

import numpy as np
import pytest
import torch
from conftest import tiny_whisper_config, write_manifest
from test_checkpoint import assert_same_trace, config, interrupted_and_resumed
from test_model import loss_of, random_batch
from trainer_helpers import read_metrics, save_short_window_whisper
from transformers import WhisperForConditionalGeneration

from orpo.model.orpo_whisper import ORPOWhisper
from orpo.train.loop import train

SPEC_AUGMENT = dict(
    mask_time_prob=0.05, mask_time_length=10, mask_time_min_masks=2, mask_feature_prob=0.1, mask_feature_length=8
)


def orpo_model(apply_spec_augment: bool) -> ORPOWhisper:
    torch.manual_seed(0)
    config = tiny_whisper_config(apply_spec_augment=apply_spec_augment, mask_feature_min_masks=1, **SPEC_AUGMENT)
    return ORPOWhisper(WhisperForConditionalGeneration(config))


def encoder_input(model: ORPOWhisper, batch: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(features the encoder was given, ORPO loss) of one forward under ``torch.manual_seed(seed)``."""
    seen = []
    handle = model.whisper.model.encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    try:
        torch.manual_seed(seed)
        loss = loss_of(model(batch))
    finally:
        handle.remove()
    return seen[0], loss


def test_training_masks_whole_frames_and_bins_per_clip():
    batch, _ = random_batch(0)
    given = batch["input_features"].clone()
    model = orpo_model(apply_spec_augment=True).train()
    numpy_state = np.random.get_state()
    masked, loss = encoder_input(model, batch)

    zero = masked == 0  # random normal features are never exactly 0
    frames, bins = zero.all(dim=1), zero.all(dim=2)  # (B, T) masked time frames, (B, F) masked mel bins
    assert torch.equal(zero, frames[:, None, :] | bins[:, :, None])
    assert (frames.sum(dim=1) >= SPEC_AUGMENT["mask_time_length"]).all()
    assert (bins.sum(dim=1) >= SPEC_AUGMENT["mask_feature_length"]).all()
    assert torch.equal(masked[~zero], given[~zero])
    assert not torch.equal(frames[0], frames[1]), "each clip gets its own masks"
    assert torch.equal(batch["input_features"], given), "the batch is not masked in place"
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state)), "numpy's RNG is untouched"
    _, unmasked_loss = encoder_input(orpo_model(apply_spec_augment=False).train(), batch)
    assert loss != unmasked_loss


def test_same_seed_same_masks_other_seed_other_masks():
    batch, _ = random_batch(1)
    model = orpo_model(apply_spec_augment=True).train()
    first, first_loss = encoder_input(model, batch, seed=7)
    again, again_loss = encoder_input(model, batch, seed=7)
    other, _ = encoder_input(model, batch, seed=8)
    assert torch.equal(first, again) and torch.equal(first_loss, again_loss)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("apply_spec_augment, training", [(True, False), (False, True), (False, False)])
def test_off_or_in_eval_nothing_changes(apply_spec_augment, training):
    batch, _ = random_batch(2)
    model = orpo_model(apply_spec_augment).train(training)
    torch.manual_seed(0)
    torch_state = torch.get_rng_state()
    features, loss = encoder_input(model, batch)
    assert torch.equal(features, batch["input_features"])
    reference = orpo_model(apply_spec_augment=False).train(training)
    assert torch.equal(loss, encoder_input(reference, batch)[1])
    torch.manual_seed(0)
    model(batch)
    assert torch.equal(torch.get_rng_state(), torch_state), "no draw from torch's RNG: dropout draws as before"


def test_training_run_masks_and_resumes_exactly(tmp_path, capsys):
    """Through the training loop: the masks change the losses, and a resumed run follows the uninterrupted one."""
    manifest = write_manifest(tmp_path / "data", count=5)
    model = save_short_window_whisper(tmp_path / "model", apply_spec_augment=True, **SPEC_AUGMENT)
    runs = interrupted_and_resumed(model, manifest, tmp_path / "runs", capsys)
    assert_same_trace(runs["root"])
    plain = save_short_window_whisper(tmp_path / "plain", **SPEC_AUGMENT)
    train(config(plain, manifest, tmp_path / "plain-run"))
    assert read_metrics(tmp_path / "plain-run")[0]["loss"] != read_metrics(runs["root"] / "A")[0]["loss"]
