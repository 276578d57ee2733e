"""Memory-lean techniques: each alone and combined keeps loss and gradients equal to the two-pass reference,
and each saves the activation memory it should (measured two independent ways)."""

import pytest
import torch
from test_model import EOT, assert_gradients_close, gradients, loss_of, random_batch, tiny_model

from orpo.data.sampling import LengthGroupedSampler, padding_fraction
from orpo.model.attention import token_major_attention
from orpo.model.orpo_whisper import ORPOWhisper, freeze_encoder
from orpo.model.recompute import SavedBytes, observe_saved_tensors
from orpo.model.reference import two_pass_forward

TECHNIQUES = {
    "selective": {"selective_recompute": True},
    "checkpointing": {"checkpointing": True},
    "freeze_encoder": {"freeze_encoder": True},
    "selective+checkpointing": {"selective_recompute": True, "checkpointing": True},
    "selective+freeze_encoder": {"selective_recompute": True, "freeze_encoder": True},
    "all": {"selective_recompute": True, "checkpointing": True, "freeze_encoder": True},
}


def configured_model(seed, checkpointing=False, freeze=False):
    model = tiny_model(seed)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if freeze:
        freeze_encoder(model)
    return model


@pytest.mark.parametrize("name", sorted(TECHNIQUES))
def test_technique_keeps_loss_and_gradients_of_two_pass_reference(name):
    options = TECHNIQUES[name]
    model = configured_model(11, options.get("checkpointing", False), options.get("freeze_encoder", False))
    batch, _ = random_batch(21)
    ours = loss_of(ORPOWhisper(model, selective_recompute=options.get("selective_recompute", False))(batch))
    reference = loss_of(two_pass_forward(model, batch, pad_token_id=EOT))
    assert abs(ours.item() - reference.item()) <= 1e-5 * abs(reference.item())
    got, want = gradients(model, ours), gradients(model, reference)
    assert_gradients_close(got, want, rel=1e-5)
    if options.get("freeze_encoder"):
        assert not any(p.requires_grad for p in model.model.encoder.parameters())


def saved_bytes(model, batch, run) -> int:
    counter = SavedBytes([*model.parameters(), *batch.values()])
    with observe_saved_tensors(counter):
        loss = run()
    del loss
    return counter.total


def retained_bytes(run) -> int:
    """Bytes still allocated after the forward, from the profiler's allocation events: a count that knows
    nothing about saved-tensor hooks."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = run()
    del loss
    return sum(event.self_cpu_memory_usage for event in prof.events())


def test_selective_recompute_drops_exactly_the_layernorm_and_gelu_outputs():
    """Independent count: every LayerNorm output and every GELU output of every layer, in float32."""
    model = tiny_model(1)
    batch, _ = random_batch(2)
    config = model.config
    rows, width = batch["decoder_input_ids"].shape
    encoder_tokens = rows * config.max_source_positions
    expected = 4 * config.encoder_layers * encoder_tokens * (2 * config.d_model + config.encoder_ffn_dim)
    expected += 4 * config.decoder_layers * rows * width * (3 * config.d_model + config.decoder_ffn_dim)
    plain = saved_bytes(model, batch, lambda: loss_of(ORPOWhisper(model)(batch)))
    selective = saved_bytes(model, batch, lambda: loss_of(ORPOWhisper(model, selective_recompute=True)(batch)))
    assert plain - selective == expected


def test_token_major_attention_shares_one_output_copy_per_attention_layer():
    model = tiny_model(2)
    batch, _ = random_batch(3)
    features, ids = batch["input_features"], batch["decoder_input_ids"]

    def run():
        return model(input_features=features, decoder_input_ids=ids).logits.sum()

    plain = saved_bytes(model, batch, run)
    with token_major_attention(model):
        token_major = saved_bytes(model, batch, run)
    config = model.config
    rows, width = ids.shape
    # one attention output (tokens x d_model, float32) per self- and cross-attention layer
    expected = (
        4
        * config.d_model
        * (config.encoder_layers * rows * config.max_source_positions + 2 * config.decoder_layers * rows * width)
    )
    assert plain - token_major == expected
    assert model.config._attn_implementation == "sdpa"  # restored after the block


def test_activation_memory_ratios_agree_between_two_independent_counts():
    model = tiny_model(4)
    batch, _ = random_batch(5, slots_per_clip=(2, 2))
    runs = {
        "two-pass": lambda: loss_of(two_pass_forward(model, batch, pad_token_id=EOT)),
        "one-pass": lambda: loss_of(ORPOWhisper(model)(batch)),
        "selective": lambda: loss_of(ORPOWhisper(model, selective_recompute=True)(batch)),
    }
    hooks = {name: saved_bytes(model, batch, run) for name, run in runs.items()}
    profiler = {name: retained_bytes(run) for name, run in runs.items()}
    for name in runs:
        assert profiler[name] == pytest.approx(hooks[name], rel=0.05), name
    assert hooks["one-pass"] < 0.5 * hooks["two-pass"]
    assert hooks["selective"] < 0.8 * hooks["one-pass"]  # tiny shapes: ffn only 2x d_model
    freeze_encoder(model)
    frozen = saved_bytes(model, batch, runs["one-pass"])
    assert frozen < 0.1 * hooks["two-pass"]


def test_length_grouped_sampler_orders_and_reduces_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 200, (400,), generator=gen).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3, group_batches=10)
    first = list(sampler)
    assert sorted(first) == list(range(400))
    assert list(sampler) == first  # same epoch, same order
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(400)) and second != first
    again = LengthGroupedSampler(lengths, batch_size=8, seed=3, group_batches=10)
    again.set_epoch(1)
    assert list(again) == second  # a resumed run sees the same order
    shuffled = torch.randperm(400, generator=gen).tolist()
    assert padding_fraction(lengths, first, 8) < 0.5 * padding_fraction(lengths, shuffled, 8)
    batches = [[lengths[i] for i in first[start : start + 8]] for start in range(0, 400, 8)]
    assert all(batch == sorted(batch, reverse=True) for batch in batches)  # slices of sorted mega-batches
    assert [max(b) for b in batches] != sorted((max(b) for b in batches), reverse=True)  # batch order shuffled
