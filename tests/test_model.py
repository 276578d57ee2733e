"""The one-pass ORPO forward against the two-pass reference and an independent float64 computation."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_whisper_config, write_manifest
from transformers import WhisperForConditionalGeneration

from orpo.data.collate import PreferenceCollator
from orpo.data.dataset import PreferenceDataset
from orpo.data.manifest import read_manifest
from orpo.data.tokens import WhisperTokens
from orpo.loss.orpo import orpo_loss
from orpo.model.orpo_whisper import ORPOWhisper
from orpo.model.reference import two_pass_forward

EOT, SOT, EN, TRANSCRIBE, NO_TIMESTAMPS = 50257, 50258, 50259, 50359, 50363


def tiny_model(seed=0, dtype=torch.float32, attn="sdpa"):
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(tiny_whisper_config(attn_implementation=attn))
    return model.to(dtype)


def random_batch(seed, slots_per_clip=(2, 3, 2), dtype=torch.float32):
    """Random features and random transcripts (text ids below the special tokens), packed by the collator."""
    gen = torch.Generator().manual_seed(seed)
    prefix = [SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]
    features = []
    for index, slots in enumerate(slots_per_clip):
        segments = []
        for _ in range(slots):
            length = int(torch.randint(1, 12, (1,), generator=gen))
            text = torch.randint(0, 50256, (length,), generator=gen).tolist()
            segments.append((prefix + text + [EOT], len(prefix)))
        features.append(
            {"input_features": torch.randn(80, 3000, generator=gen).numpy(), "segments": segments, "index": index}
        )
    batch = PreferenceCollator(pad_token_id=EOT)(features)
    batch["input_features"] = batch["input_features"].to(dtype)
    return batch, features


def loss_of(out, alpha=0.5):
    return orpo_loss(out["logps_chosen"], out["logps_rejected"], out["rejected_mask"], out["nll_chosen"], alpha)[0]


def gradients(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def assert_gradients_close(got, want, rel, per_parameter_rel=None):
    """The whole gradient within ``rel`` of the reference, and each parameter's within ``per_parameter_rel``
    (default ``rel``) of its own."""
    diff = torch.sqrt(sum(((g - w) ** 2).sum() for g, w in zip(got, want)))
    norm = torch.sqrt(sum((w**2).sum() for w in want))
    assert norm > 0
    assert (diff / norm).item() <= rel
    for g, w in zip(got, want):
        assert torch.linalg.norm(g - w) <= (per_parameter_rel or rel) * torch.linalg.norm(w) + 1e-9


@pytest.mark.parametrize(
    ("seed", "attn", "disable_prompt_loss"), [(0, "sdpa", True), (1, "sdpa", False), (2, "eager", True)]
)
def test_one_pass_equals_two_pass_reference(seed, attn, disable_prompt_loss):
    model = tiny_model(seed, attn=attn)
    batch, _ = random_batch(seed + 10)
    ours = ORPOWhisper(model, disable_prompt_loss=disable_prompt_loss)(batch)
    reference = two_pass_forward(model, batch, disable_prompt_loss=disable_prompt_loss, pad_token_id=EOT)
    for key in ("logps_chosen", "logps_rejected", "nll_chosen"):
        assert torch.allclose(ours[key], reference[key], rtol=1e-5, atol=1e-6), key
    assert torch.equal(ours["rejected_mask"], reference["rejected_mask"])
    loss, loss_ref = loss_of(ours), loss_of(reference)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert_gradients_close(gradients(model, loss), gradients(model, loss_ref), rel=1e-5)


def independent_float64_loss(model, features, alpha=0.5, disable_prompt_loss=True):
    """ORPO written out plainly: each transcript alone through the model, mean log-prob, odds, log-sigmoid."""
    losses = []
    for clip in features:
        mel = torch.as_tensor(clip["input_features"], dtype=torch.float64)[None]
        averages, nll = [], None
        for slot, (ids, prefix_len) in enumerate(clip["segments"]):
            tokens = torch.tensor(ids)[None]
            logits = model(input_features=mel, decoder_input_ids=tokens[:, :-1]).logits[0]
            logp = F.log_softmax(logits.double(), dim=-1).gather(-1, tokens[0, 1:, None]).squeeze(-1)
            transcript = logp[prefix_len - 1 :]
            averages.append(transcript.mean())
            if slot == 0:
                nll = -(transcript.mean() if disable_prompt_loss else logp.mean())
        chosen, rejected = averages[0], averages[1:]
        terms = []
        for r in rejected:
            log_odds = (chosen - torch.log(1 - torch.exp(chosen))) - (r - torch.log(1 - torch.exp(r)))
            terms.append(-torch.log(1 + torch.exp(-log_odds)))
        losses.append(nll - alpha * torch.stack(terms).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("disable_prompt_loss", [True, False])
def test_matches_independent_float64_computation(disable_prompt_loss):
    model64 = tiny_model(3, dtype=torch.float64)
    batch, features = random_batch(7, dtype=torch.float64)
    want = independent_float64_loss(model64, features, disable_prompt_loss=disable_prompt_loss)
    want_grads = gradients(model64, want)

    got64 = loss_of(ORPOWhisper(model64, disable_prompt_loss=disable_prompt_loss)(batch))
    assert got64.dtype == torch.float64
    assert abs(got64.item() - want.item()) <= 1e-10 * abs(want.item())
    assert_gradients_close(gradients(model64, got64), want_grads, rel=1e-9)

    model32 = tiny_model(3)
    batch32, _ = random_batch(7)
    got32 = loss_of(ORPOWhisper(model32, disable_prompt_loss=disable_prompt_loss)(batch32))
    assert abs(got32.item() - want.item()) <= 1e-5 * abs(want.item())
    assert_gradients_close([g.double() for g in gradients(model32, got32)], want_grads, rel=1e-4)


def test_encoder_and_decoder_run_once_per_forward():
    model = tiny_model()
    calls = {"encoder": 0, "decoder": 0, "encoder_rows": 0}

    def count(name):
        def hook(module, args, kwargs):
            calls[name] += 1
            if name == "encoder":
                calls["encoder_rows"] += (args[0] if args else kwargs["input_features"]).shape[0]

        return hook

    model.model.encoder.register_forward_pre_hook(count("encoder"), with_kwargs=True)
    model.model.decoder.register_forward_pre_hook(count("decoder"), with_kwargs=True)
    batch, _ = random_batch(0, slots_per_clip=(3, 2, 4, 2))
    loss_of(ORPOWhisper(model)(batch)).backward()
    assert calls == {"encoder": 1, "decoder": 1, "encoder_rows": 4}
    assert batch["decoder_input_ids"].shape[0] == 4  # one packed decoder row per clip


def test_disable_prompt_loss_adds_the_prefix_to_the_nll_only():
    model = tiny_model()
    batch, _ = random_batch(4)
    with torch.no_grad():
        without_prompt = ORPOWhisper(model, disable_prompt_loss=True)(batch)
        with_prompt = ORPOWhisper(model, disable_prompt_loss=False)(batch)
    assert torch.equal(without_prompt["logps_chosen"], with_prompt["logps_chosen"])
    assert torch.equal(without_prompt["logps_rejected"], with_prompt["logps_rejected"])
    assert not torch.allclose(without_prompt["nll_chosen"], with_prompt["nll_chosen"])


def test_real_manifest_path_matches_reference(tmp_path, processor):
    """Audio files, the real tokenizer, the dataset and the collator, end to end into both forwards."""
    manifest = write_manifest(tmp_path, count=3)
    tokens = WhisperTokens(processor.tokenizer, multilingual=True, task="transcribe", timestamps=False, max_length=448)
    dataset = PreferenceDataset(read_manifest(manifest), processor.feature_extractor, tokens, None, 0.1, 30)
    batch = PreferenceCollator(tokens.eot)([dataset[i] for i in range(3)])
    model = tiny_model(5)
    ours, reference = ORPOWhisper(model)(batch), two_pass_forward(model, batch, pad_token_id=tokens.eot)
    loss, loss_ref = loss_of(ours), loss_of(reference)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert_gradients_close(gradients(model, loss), gradients(model, loss_ref), rel=1e-5)
