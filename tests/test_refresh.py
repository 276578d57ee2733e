"""Pairs refreshed from the model during training (refresh_pairs_steps), on tiny random models: the rejected
transcripts become the model's own current hypotheses (checked against a direct ``generate`` call), a clip the model
gets right keeps its rejected transcripts, and a run stopped at a refresh or between two refreshes resumes to the
uninterrupted run's per-step losses; DPO's reference log-probs of refreshed pairs come from the base model, once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES, write_clip
from test_checkpoint import send_signal_during_micro_batch
from trainer_helpers import read_metrics, save_short_window_whisper
from transformers import GenerationMixin, WhisperForConditionalGeneration

import orpo.eval.reference
import orpo.train.loop
import orpo.train.refresh
from orpo.config import TrainConfig
from orpo.data.manifest import read_manifest
from orpo.eval.generate import generate, whisper_for_generation
from orpo.eval.nbest import Scorer, average_token_logprobs, nbest_config, nbest_hypotheses
from orpo.model.orpo_whisper import ORPOWhisper
from orpo.train.checkpoint import load_state_objects
from orpo.train.loop import ORPOTrainer, train
from orpo.train.refresh import pairs_file

STEPS = 6
MAX_LENGTH = 12  # decoder tokens of a hypothesis, prefix included: the random model never stops by itself


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_short_window_whisper(tmp_path_factory.mktemp("tiny"), seed=1, dropout=0.1, attention_dropout=0.1)


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory) -> Path:
    """Without dropout: before its first update the trained model computes exactly what the reference does."""
    return save_short_window_whisper(tmp_path_factory.mktemp("tiny-plain"), seed=1)


def write_pairs(folder: Path, chosen_rejected: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (chosen, rejected) in enumerate(chosen_rejected):
        clip = write_clip(folder / f"clip-{i}.wav", 1.0, seed=i)
        lines.append(json.dumps({"audio": clip.name, "chosen": chosen, "rejected": rejected, "language": "en"}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("data"), SENTENCES[:5])


def config(model_dir: Path, manifest: Path, output_dir: Path, **overrides) -> TrainConfig:
    settings = dict(
        base_model=str(model_dir),
        train_data=str(manifest),
        output_dir=str(output_dir),
        learning_rate=1e-3,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=1,
        logging_steps=1,
        report_to=[],
        seed=5,
        refresh_pairs_steps=2,
        refresh_num_beams=3,
        refresh_num_rejected=2,
        generation_max_length=MAX_LENGTH,
        lora_r=4,
        lora_alpha=8,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture
def trainer_of():
    """ORPOTrainer.setup() of a recipe, cleaned up after the test."""
    trainers = []

    def make(cfg: TrainConfig) -> ORPOTrainer:
        trainer = ORPOTrainer(cfg)
        trainers.append(trainer)
        trainer.setup()
        return trainer

    yield make
    for trainer in trainers:
        trainer.cleanup()


def direct_generate(trainer: ORPOTrainer, index: int, **kwargs):
    """``generate`` called on one clip directly: its clean features, its training prefix, timestamps suppressed."""
    dataset = trainer.train_set.without_augmentation()
    whisper = whisper_for_generation(trainer.model, trainer.accelerator).eval()
    features = torch.from_numpy(dataset[index]["input_features"])[None]
    prefix = torch.tensor([dataset.tokens.prefix(dataset.items[index].language, timestamps=False)])
    tokenizer = dataset.tokens.tokenizer
    first_timestamp = tokenizer.convert_tokens_to_ids("<|0.00|>")
    with torch.no_grad():
        out = GenerationMixin.generate(
            whisper,
            input_features=features,
            decoder_input_ids=prefix,
            max_length=MAX_LENGTH,
            suppress_tokens=list(range(first_timestamp, whisper.config.vocab_size)),
            return_dict_in_generate=True,
            **kwargs,
        )
    texts = tokenizer.batch_decode(out.sequences[:, prefix.shape[1] :], skip_special_tokens=True)
    return out, [text.strip() for text in texts], prefix.shape[1]


def test_a_refresh_replaces_the_rejected_transcripts_with_the_models_own_hypotheses(
    model_dir, manifest, tmp_path, trainer_of
):
    trainer = trainer_of(config(model_dir, manifest, tmp_path / "run"))
    metrics = trainer.refresher(trainer.model, step=2)
    assert metrics["refresh/clips_decoded"] == 5 and metrics["refresh/seconds"] > 0
    scorer, changed = Scorer(), 0
    for index, item in enumerate(trainer.train_set.items):
        out, texts, _ = direct_generate(trainer, index, num_beams=3, num_return_sequences=3, output_scores=True)
        best_first = [text for _, text in sorted(zip(out.sequences_scores.tolist(), texts), key=lambda p: -p[0])]
        normalized = scorer.normalize(item.sample.chosen, "en")
        wrong = []
        for text in best_first:
            norm = scorer.normalize(text, "en")
            if text and norm != normalized and norm not in {scorer.normalize(w, "en") for w in wrong}:
                wrong.append(text)
        assert trainer.pairs.rejected(index) == wrong[:2], index
        assert trainer.pairs.rejected(index) != [SENTENCES[index][1]]
        changed += 1
    assert metrics["refresh/clips_changed"] == changed
    # the decoder rows a batch takes now hold the new rejected transcripts, tokenised as a manifest's are
    rows = trainer.pairs.decoder_fields(torch.tensor([0]))
    assert int(rows["num_segments"][0]) == 1 + len(trainer.pairs.rejected(0))
    # the audit file is a manifest the trainer reads, with these pairs
    samples = read_manifest(pairs_file(tmp_path / "run", 2))
    assert [s.rejected for s in samples] == [trainer.pairs.rejected(i) for i in range(5)]
    assert [s.chosen for s in samples] == [chosen for chosen, _ in SENTENCES[:5]]


def test_a_clip_whose_hypotheses_are_all_right_keeps_its_rejected_transcripts(model_dir, tmp_path, trainer_of):
    probe = write_pairs(tmp_path / "probe", SENTENCES[:3])
    trainer = trainer_of(config(model_dir, probe, tmp_path / "probe-run", refresh_num_beams=1, refresh_num_rejected=1))
    _, (greedy,), _ = direct_generate(trainer, 0, num_beams=1, do_sample=False)
    assert greedy, "the tiny model's greedy transcript of clip 0 is empty: pick another seed"
    trainer.cleanup()
    # clip 0's chosen transcript is what the model says: its only (greedy) hypothesis is right
    data = write_pairs(tmp_path / "data", [(greedy, "something else entirely"), *SENTENCES[1:3]])
    trainer = trainer_of(config(model_dir, data, tmp_path / "run", refresh_num_beams=1, refresh_num_rejected=1))
    metrics = trainer.refresher(trainer.model, step=2)
    assert trainer.pairs.rejected(0) == ["something else entirely"]
    assert trainer.pairs.rejected(1) != [SENTENCES[1][1]] and trainer.pairs.rejected(2) != [SENTENCES[2][1]]
    assert metrics["refresh/clips_decoded"] == 3 and metrics["refresh/clips_changed"] == 2


def test_refresh_clips_are_a_seeded_draw_and_only_they_change(model_dir, manifest, tmp_path, trainer_of):
    trainer = trainer_of(config(model_dir, manifest, tmp_path / "run", refresh_clips=2))
    picked = trainer.refresher.clips(4)
    assert picked == trainer.refresher.clips(4) and len(set(picked)) == 2 and picked == sorted(picked)
    assert {tuple(trainer.refresher.clips(step)) for step in range(2, 40, 2)} != {tuple(picked)}
    metrics = trainer.refresher(trainer.model, step=4)
    assert metrics["refresh/clips_decoded"] == 2
    untouched = [i for i in range(5) if i not in picked]
    assert all(trainer.pairs.rejected(i) == [SENTENCES[i][1]] for i in untouched)
    assert all(trainer.pairs.rejected(i) != [SENTENCES[i][1]] for i in picked)


def test_sampled_hypotheses_are_scored_by_their_own_log_probs_and_drawn_reproducibly(
    model_dir, manifest, tmp_path, trainer_of
):
    trainer = trainer_of(config(model_dir, manifest, tmp_path / "run", refresh_mode="sample", refresh_temperature=1.5))
    whisper = whisper_for_generation(trainer.model, trainer.accelerator).eval()
    dataset = trainer.train_set.without_augmentation()
    tokenizer = dataset.tokens.tokenizer
    features = torch.from_numpy(dataset[0]["input_features"])[None]
    prefix = torch.tensor([dataset.tokens.prefix("en", timestamps=False)])
    length, eot = prefix.shape[1], tokenizer.eos_token_id
    generation = nbest_config(whisper, tokenizer, 4, "sample", 1.5)
    torch.manual_seed(0)
    with torch.no_grad():
        out = generate(whisper, features, prefix, generation, MAX_LENGTH)
        scores = average_token_logprobs(out, length, eot)
        for sequence, score in zip(out.sequences, scores.tolist()):
            # the hypothesis's own average token log-prob by teacher forcing, up to and with <|endoftext|>
            generated = sequence[length:].tolist()
            kept = generated[: generated.index(eot) + 1] if eot in generated else generated
            decoder_input = sequence[: length + len(kept) - 1][None]
            logits = whisper(input_features=features, decoder_input_ids=decoder_input).logits[0, length - 1 :].double()
            logps = torch.log_softmax(logits, -1).gather(-1, torch.tensor(kept)[:, None])
            assert score == pytest.approx(logps.mean().item(), rel=1e-5)
        torch.manual_seed(0)
        (hypotheses,) = nbest_hypotheses(whisper, features, prefix, tokenizer, generation, MAX_LENGTH)
    assert [score for _, score in hypotheses] == sorted(scores.tolist(), reverse=True)
    first = trainer.refresher.decode(trainer.model, [0, 1], step=2, stop=None)
    assert first == trainer.refresher.decode(trainer.model, [0, 1], step=2, stop=None)
    assert first != trainer.refresher.decode(trainer.model, [0, 1], step=4, stop=None)


def stopped_and_resumed(model_dir, manifest, root: Path, micro_batch: int, **overrides) -> Path:
    """A run SIGTERMed in ``micro_batch`` (1-based; two per optimizer step), then resumed from latest."""
    mp = pytest.MonkeyPatch()
    try:
        send_signal_during_micro_batch(mp, micro_batch=micro_batch)
        assert train(config(model_dir, manifest, root, **overrides)) == {}
    finally:
        mp.undo()
    train(config(model_dir, manifest, root, resume_from_checkpoint="latest", **overrides))
    return root


@pytest.mark.parametrize(
    "recipe",
    [{}, {"loss_type": "dpo", "peft": "lora", "refresh_keep_manifest_rejected": True}],
    ids=["orpo", "dpo-lora-keep-manifest"],
)
def test_a_run_stopped_at_or_between_refreshes_resumes_to_the_same_losses(model_dir, manifest, tmp_path, recipe):
    uninterrupted = tmp_path / "A"
    train(config(model_dir, manifest, uninterrupted, **recipe))
    # during step 2: the refresh due after it is interrupted, and done first on resume; during step 3: mid-interval
    resumed = {
        "at a refresh": stopped_and_resumed(model_dir, manifest, tmp_path / "B", micro_batch=3, **recipe),
        "between refreshes": stopped_and_resumed(model_dir, manifest, tmp_path / "C", micro_batch=5, **recipe),
    }
    reference = [r for r in read_metrics(uninterrupted) if "loss" in r]
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    for name, folder in resumed.items():
        trace = [r for r in read_metrics(folder) if "loss" in r]
        assert [r["step"] for r in trace] == list(range(1, STEPS + 1)), name
        for a, b in zip(reference, trace):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), (name, a["step"])
            assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-6), (name, a["step"])
        for step in (2, 4):
            assert pairs_file(folder, step).read_text() == pairs_file(uninterrupted, step).read_text(), (name, step)
    refreshes = [r for r in read_metrics(uninterrupted) if "refresh/wer" in r]
    assert [r["step"] for r in refreshes] == [2, 4] and all(r["refresh/clips_changed"] > 0 for r in refreshes[:1])
    # the refreshed pairs are trained on: after the first refresh the rejected log-probs move to the model's own
    assert pairs_file(uninterrupted, 2).read_text() != (manifest.read_text())


def count_reference_clips(monkeypatch) -> list[int]:
    """How many clips each reference pass scores (the loop's and the refresh's)."""
    counts = []
    real = orpo.eval.reference.reference_logps

    def counting(model, dataset, indices, *args, **kwargs):
        counts.append(len(indices))
        return real(model, dataset, indices, *args, **kwargs)

    monkeypatch.setattr(orpo.train.loop, "reference_logps", counting)
    monkeypatch.setattr(orpo.train.refresh, "reference_logps", counting)
    return counts


def test_dpo_reference_log_probs_are_computed_once_per_pair_from_the_base_model(
    model_dir, manifest, tmp_path, monkeypatch
):
    counts = count_reference_clips(monkeypatch)
    output_dir = tmp_path / "run"
    # 6 steps of 2 x 2 clips over 5 clips: two epochs and more, refreshes at steps 2 and 4
    train(
        config(model_dir, manifest, output_dir, loss_type="dpo", peft="lora", save_steps=STEPS - 1, learning_rate=1e-2)
    )
    changed = [r["refresh/clips_changed"] for r in read_metrics(output_dir) if "refresh/clips_changed" in r]
    assert counts == [5] + [int(n) for n in changed if n > 0], "a pair's reference was computed more than once"
    # the reference of every pair, refreshed ones included, is the base model's: no adapter, eval mode, clean audio
    base = ORPOWhisper(WhisperForConditionalGeneration.from_pretrained(model_dir)).eval()
    trainer = ORPOTrainer(config(model_dir, manifest, tmp_path / "probe", loss_type="dpo", peft="lora"))
    try:
        trainer.setup()
        load_state_objects({"pairs": trainer.pairs}, output_dir / f"checkpoint-{STEPS - 1}")  # as a resume does
        assert trainer.pairs.changed and not trainer.pairs.missing_reference()
        batch = trainer.pairs.decoder_fields(torch.arange(5))
        clean = trainer.train_set.without_augmentation()
        batch["input_features"] = torch.stack([torch.from_numpy(clean[i]["input_features"]) for i in range(5)])
        with torch.no_grad():
            out = base(batch)
        sums = (out["logps_chosen"] * out["tokens_chosen"]).tolist()
        rejected_sums = (out["logps_rejected"] * out["tokens_rejected"]).tolist()
        for index in range(5):
            want = [sums[index]] + rejected_sums[index][: len(trainer.pairs.rejected(index))]
            assert trainer.pairs.reference_of(index) == pytest.approx(want, rel=1e-5), index
    finally:
        trainer.cleanup()


def test_a_full_fine_tune_computes_its_ipo_reference_once_and_resumes_without_it(
    plain_model_dir, manifest, tmp_path, monkeypatch
):
    model_dir = plain_model_dir
    counts = count_reference_clips(monkeypatch)
    recipe = dict(loss_type="ipo", refresh_pairs_steps=0, test_data=str(manifest), per_device_eval_batch_size=2)
    train(config(model_dir, manifest, tmp_path / "A", **recipe))
    assert counts == [5, 5], "train and test references, each once over two epochs"
    first = read_metrics(tmp_path / "A")[0]
    assert first["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-6), "at step 1 the policy is the reference"
    counts.clear()
    stopped_and_resumed(model_dir, manifest, tmp_path / "B", micro_batch=5, **recipe)
    assert counts == [5, 5], "the stopped run computed them; the resumed one read them from its checkpoint"
    trace_a = [r["loss"] for r in read_metrics(tmp_path / "A") if "loss" in r]
    trace_b = [r["loss"] for r in read_metrics(tmp_path / "B") if "loss" in r]
    assert trace_b == pytest.approx(trace_a, abs=1e-6)
    shutil.rmtree(tmp_path / "A")
