"""Several rejected transcripts per clip: one encoder pass and one decoder pass serve all 1+K transcripts,
and the loss and gradients equal K separate two-pass computations (chosen vs rejected_k), averaged."""

from __future__ import annotations

import json

import torch
from conftest import tiny_whisper_config, write_clip
from transformers import WhisperForConditionalGeneration

from orpo.data.collate import PreferenceCollator
from orpo.data.dataset import PreferenceDataset
from orpo.data.manifest import read_manifest
from orpo.data.tokens import WhisperTokens
from orpo.loss.orpo import orpo_loss
from orpo.model.orpo_whisper import ORPOWhisper
from orpo.model.reference import two_pass_forward

EOT = 50257
ALPHA = 0.5
# (chosen, rejected transcripts): K = 3, 1 and 4 rejected
CLIPS = [
    ("we meet at two o'clock", ["we meet at to o'clock", "we met at two", "wee meat at two o'clock"]),
    ("the cat sat on the mat", ["the cat sat on the map"]),
    ("please write it down", ["please right it down", "please write it town", "police write it down", "please write"]),
]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return WhisperForConditionalGeneration(tiny_whisper_config(attn_implementation="sdpa"))


def dataset(tmp_path, processor, clips):
    lines = []
    for i, (chosen, rejected) in enumerate(clips):
        write_clip(tmp_path / f"c{i}.wav", 1.0 + 0.25 * i, seed=i)
        lines.append(
            json.dumps(
                {
                    "audio": {"path": f"c{i}.wav"},
                    "chosen": chosen,
                    "rejected": rejected if len(rejected) > 1 else rejected[0],
                    "language": "en",
                }
            )
        )
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    tokens = WhisperTokens(processor.tokenizer, multilingual=True, task="transcribe", timestamps=False, max_length=448)
    return PreferenceDataset(read_manifest(tmp_path / "m.jsonl"), processor.feature_extractor, tokens, None, 0.0, 30.0)


def pair_features(item: dict, k: int) -> dict:
    """The same clip with only its chosen and its k-th rejected transcript."""
    return {**item, "segments": [item["segments"][0], item["segments"][1 + k]]}


def test_k_rejected_one_pass_equals_k_separate_two_pass_pairs(tmp_path, processor):
    ds = dataset(tmp_path, processor, CLIPS)
    items = [ds[i] for i in range(len(ds))]
    model = tiny_model(1)
    params = [p for p in model.parameters() if p.requires_grad]

    calls = {"encoder": 0, "decoder": 0, "encoder_rows": 0, "decoder_rows": 0}

    def count(name):
        def hook(module, args, kwargs):
            calls[name] += 1
            if name == "encoder":
                calls["encoder_rows"] += (args[0] if args else kwargs["input_features"]).shape[0]
            else:
                calls["decoder_rows"] += (args[0] if args else kwargs["input_ids"]).shape[0]

        return hook

    handles = [
        model.model.encoder.register_forward_pre_hook(count("encoder"), with_kwargs=True),
        model.model.decoder.register_forward_pre_hook(count("decoder"), with_kwargs=True),
    ]
    batch = PreferenceCollator(EOT)(items)
    assert batch["num_segments"].tolist() == [4, 2, 5]
    out = ORPOWhisper(model)(batch)
    assert out["logps_rejected"].shape == (3, 4)
    assert out["rejected_mask"].tolist() == [
        [True, True, True, False],
        [True, False, False, False],
        [True, True, True, True],
    ]
    loss, _ = orpo_loss(out["logps_chosen"], out["logps_rejected"], out["rejected_mask"], out["nll_chosen"], ALPHA)
    grads = torch.autograd.grad(loss, params)
    # 3 clips, 1 + 3 + 1 + 1 + 1 + 4 = 12 transcripts: one encoder call over 3 rows, one decoder call over 3 rows
    assert calls == {"encoder": 1, "decoder": 1, "encoder_rows": 3, "decoder_rows": 3}
    for handle in handles:
        handle.remove()

    # Reference: for every k, the pairs (chosen, rejected_k) of the clips that have a k-th rejected transcript,
    # through the two-pass forward with a single rejected slot; each clip's loss is its NLL minus alpha times
    # the mean over its pairs of log sigma(log odds_k).
    pair_losses = [[] for _ in items]
    for k in range(max(len(rejected) for _, rejected in CLIPS)):
        clips = [i for i, (_, rejected) in enumerate(CLIPS) if len(rejected) > k]
        pairs = PreferenceCollator(EOT)([pair_features(items[i], k) for i in clips])
        assert pairs["num_segments"].tolist() == [2] * len(clips)
        ref = two_pass_forward(model, pairs, pad_token_id=EOT)
        for j, i in enumerate(clips):
            one = slice(j, j + 1)
            pair_loss, _ = orpo_loss(
                ref["logps_chosen"][one],
                ref["logps_rejected"][one],
                ref["rejected_mask"][one],
                ref["nll_chosen"][one],
                ALPHA,
            )
            pair_losses[i].append(pair_loss)  # nll_i - alpha * logsigmoid(log odds_ik); nll_i is the same for every k
    assert [len(p) for p in pair_losses] == [3, 1, 4]
    reference = torch.stack([torch.stack(p).mean() for p in pair_losses]).mean()
    reference_grads = torch.autograd.grad(reference, params)

    assert abs(loss.item() - reference.item()) <= 1e-5 * abs(reference.item())
    diff = torch.sqrt(sum(((g - r) ** 2).sum() for g, r in zip(grads, reference_grads)))
    norm = torch.sqrt(sum((r**2).sum() for r in reference_grads))
    assert norm > 0 and (diff / norm).item() <= 1e-5
    for g, r in zip(grads, reference_grads):
        assert torch.linalg.norm(g - r) <= 1e-5 * torch.linalg.norm(r) + 1e-9


def test_k_rejected_statistics_match_pairwise(tmp_path, processor):
    """Each rejected slot's average log-prob in the packed row is that transcript's own, as in its pair."""
    ds = dataset(tmp_path, processor, CLIPS[:1])
    item = ds[0]
    model = tiny_model(2)
    with torch.no_grad():
        packed = ORPOWhisper(model)(PreferenceCollator(EOT)([item]))
        for k in range(3):
            pair = ORPOWhisper(model)(PreferenceCollator(EOT)([pair_features(item, k)]))
            assert torch.allclose(packed["logps_rejected"][0, k], pair["logps_rejected"][0, 0], rtol=1e-5, atol=1e-6)
            assert torch.allclose(packed["logps_chosen"], pair["logps_chosen"], rtol=1e-5, atol=1e-6)
            assert torch.allclose(packed["nll_chosen"], pair["nll_chosen"], rtol=1e-5, atol=1e-6)
