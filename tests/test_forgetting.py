"""The forgetting guard (issue 15, part 2): ``regression_data`` transcribed at the start and at each evaluation,
its change from the base model, ``max_regression`` stopping a run or excluding evaluations from selection, per
language WER and language identification; and the odds-ratio term's gradient share (``log_grad_share``)."""

from __future__ import annotations

import copy
import json

import jiwer
import pytest
import torch
from conftest import save_tiny_whisper, write_manifest
from test_selection import config as selection_config
from test_selection import final_weights_equal
from trainer_helpers import manifest, model_dir, read_metrics  # noqa: F401 (fixtures)
from transformers import WhisperForConditionalGeneration

import orpo.train.loop
from orpo.config import TrainConfig
from orpo.data.collate import PreferenceCollator
from orpo.data.dataset import build_regression_dataset, load_regression_samples
from orpo.data.normalize import TextNormalizer
from orpo.data.tokens import WhisperTokens
from orpo.eval.regression import RegressionEvaluator, language_token_ids
from orpo.loss.orpo import orpo_loss
from orpo.model.load import load_processor
from orpo.model.orpo_whisper import ORPOWhisper
from orpo.train.grad_share import gradient_share
from orpo.train.logs import logged_base_results
from orpo.train.loop import train
from orpo.train.plots import training_curves_figure


def regression_manifest(folder, references: list[str], languages: list[str]) -> str:
    """A plain ASR manifest over the clips of ``write_manifest`` with the given reference texts."""
    clips = [json.loads(line) for line in write_manifest(folder, count=len(references)).read_text().splitlines()]
    path = folder / "regression.jsonl"
    rows = [
        {"audio": clip["audio"], "duration": clip["duration"], "text": text, "language": language}
        for clip, text, language in zip(clips, references, languages)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def evaluator(cfg: TrainConfig, model_path) -> tuple[RegressionEvaluator, WhisperForConditionalGeneration]:
    processor = load_processor(str(model_path))
    whisper = WhisperForConditionalGeneration.from_pretrained(model_path).eval()
    tokens = WhisperTokens.for_model(processor.tokenizer, whisper.config)
    dataset = build_regression_dataset(cfg, processor.feature_extractor, tokens)
    return RegressionEvaluator.from_config(cfg, dataset, None), whisper


def base_transcripts(model_dir, manifest, folder) -> str:  # noqa: F811
    """A regression set whose references are the base model's own greedy transcripts: its regression WER is 0, so
    any change the training makes to its transcripts is a rise."""
    first = regression_manifest(folder / "first", ["placeholder words"] * 4, ["English"] * 4)
    cfg = TrainConfig(
        base_model=str(model_dir),
        train_data=str(manifest),
        test_data=str(manifest),
        regression_data=first,
        generation_max_length=12,
        report_to=[],
    )
    regression, whisper = evaluator(cfg, model_dir)
    assert regression(ORPOWhisper(whisper), tag="base")["regression/wer"] > 0
    texts = regression.wer.transcripts["base"]
    assert all(TextNormalizer()(text, "en") for text in texts.values())
    return regression_manifest(folder / "own", [texts[i] for i in range(4)], ["English"] * 4)


def config(model_dir, manifest, output_dir, regression, **overrides) -> TrainConfig:  # noqa: F811
    """test_selection's recipe with a regression set: 6 steps, an evaluation every 2, no selection unless asked."""
    values = dict(max_steps=6, eval_steps=2, save_steps=0, load_best_model_at_end=False, generation_max_length=12)
    return selection_config(model_dir, manifest, output_dir, regression_data=regression, **{**values, **overrides})


def test_max_regression_stops_a_run_whose_regression_wer_is_forced_up(model_dir, manifest, tmp_path):  # noqa: F811
    regression = base_transcripts(model_dir, manifest, tmp_path / "data")
    # a learning rate that ruins the model: its transcripts of the regression clips change at the first evaluation
    ruined = tmp_path / "ruined"
    train(config(model_dir, manifest, ruined, regression, learning_rate=0.05, max_regression=1.0))
    records = read_metrics(ruined)
    assert records[0]["step"] == 0 and records[0]["regression/wer"] == 0.0  # the base model, before step 1
    trained = [r["step"] for r in records if "loss" in r]
    assert trained[-1] == 2  # stopped after the evaluation at step 2, not at max_steps 6
    evaluated = [r for r in records if "regression/wer_change" in r]
    assert evaluated[0]["step"] == 2 and 100 * evaluated[0]["regression/wer_change"] > 1.0
    results = json.loads((ruined / "eval_results.json").read_text())
    assert results["forgetting_guard"]["action"] == "stopped the run at step 2"
    assert results["early_stopped"].startswith("forgetting guard at step 2")
    assert results["metrics"]["regression/wer"] == evaluated[-1]["regression/wer"]
    assert (ruined / "model.safetensors").is_file()
    # the same run with a learning rate of 0 never moves: regression WER stays 0 and the run goes to its end
    still = tmp_path / "still"
    train(config(model_dir, manifest, still, regression, learning_rate=0.0, max_regression=1.0))
    records = read_metrics(still)
    assert [r["step"] for r in records if "loss" in r][-1] == 6
    assert all(r["regression/wer_change"] == 0.0 for r in records if "regression/wer_change" in r)
    assert json.loads((still / "eval_results.json").read_text())["forgetting_guard"]["action"] == "never over the limit"


def scripted(monkeypatch, wers: list[float], regression_wers: list[float]) -> None:
    """Evaluations return scripted test and regression WERs (the first regression WER is the base model's)."""
    calls = {"eval": 0, "regression": 0}

    def regression_call(self, model, tag="tuned", stop=None):
        calls["regression"] += 1
        return {"regression/wer": regression_wers[calls["regression"] - 1]}

    def evaluate(self, tag="tuned", compare_beams=False, stop=None):
        calls["eval"] += 1
        metrics = {"eval/wer": wers[calls["eval"] - 1], "eval/loss": 1.0}
        return {**metrics, **self.guard.add_change(self.regression_eval(self.model, tag=tag))}

    monkeypatch.setattr(RegressionEvaluator, "__call__", regression_call)
    monkeypatch.setattr(orpo.train.loop.ORPOTrainer, "evaluate", evaluate)


def test_with_load_best_an_evaluation_over_max_regression_is_never_the_best(
    model_dir,
    manifest,
    tmp_path,
    monkeypatch,  # noqa: F811
):
    regression = regression_manifest(tmp_path / "data", ["the cat sat"] * 4, ["English"] * 4)
    # step 2 has the best test WER, but its regression WER rose 20 points: step 3 is the best candidate
    scripted(monkeypatch, [0.5, 0.2, 0.4, 0.45, 0.4], [0.1, 0.1, 0.3, 0.1, 0.12, 0.1])
    output_dir = tmp_path / "run"
    cfg = config(
        model_dir,
        manifest,
        output_dir,
        regression,
        max_steps=4,
        eval_steps=1,
        save_steps=1,
        save_total_limit=1,
        load_best_model_at_end=True,
        max_regression=5.0,
    )
    train(cfg)
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert (results["best_model"]["step"], results["best_model"]["checkpoint"]) == (3, "checkpoint-3")
    assert results["forgetting_guard"]["over_limit"] == [2]
    assert results["forgetting_guard"]["action"] == "left steps 2 out of model selection"
    assert "early_stopped" not in results
    assert final_weights_equal(output_dir, output_dir / "checkpoint-3")
    assert [r["step"] for r in read_metrics(output_dir) if "loss" in r][-1] == 4  # excluded, not stopped


def test_a_resumed_run_measures_the_change_from_the_logged_base(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "regression/wer": 0.25, "regression/wer/de": 0.5})
        + "\n"
        + json.dumps({"step": 2, "loss": 1.0, "regression/wer": 0.5})
        + "\n"
    )
    assert logged_base_results(tmp_path) == {"regression/wer": 0.25, "regression/wer/de": 0.5}


def test_regression_data_from_a_dataset_uses_its_text_or_sentence_column(tmp_path):
    from datasets import Dataset

    manifest_path = write_manifest(tmp_path, count=3)
    rows = [json.loads(line) for line in manifest_path.read_text().splitlines()]
    audio = [str(tmp_path / row["audio"]["path"]) for row in rows]
    Dataset.from_dict({"audio": audio, "sentence": ["one two", "three four", "five six"]}).save_to_disk(tmp_path / "ds")
    cfg = TrainConfig(train_data="t.jsonl", test_data="t.jsonl", regression_data=str(tmp_path / "ds"), report_to=[])
    samples = load_regression_samples(cfg)
    assert [(s.chosen, s.rejected) for s in samples] == [("one two", []), ("three four", []), ("five six", [])]


def test_per_language_wer_and_language_identification_match_a_direct_computation(tmp_path):
    model_path = save_tiny_whisper(tmp_path / "model", seed=3)
    references = ["the cat sat", "a quick brown fox", "der hund lief", "ein kleines haus", "the dog ran"]
    languages = ["English", "English", "German", "German", "English"]
    regression = regression_manifest(tmp_path / "data", references, languages)
    cfg = TrainConfig(
        base_model=str(model_path),
        train_data="t.jsonl",
        test_data="t.jsonl",
        regression_data=regression,
        generation_max_length=10,
        per_device_eval_batch_size=2,
        report_to=[],
    )
    regression_eval, whisper = evaluator(cfg, model_path)
    metrics = regression_eval(ORPOWhisper(whisper), tag="tuned")
    texts = regression_eval.wer.transcripts["tuned"]
    normalize = TextNormalizer()
    for code, name in (("en", "English"), ("de", "German")):
        clips = [i for i, language in enumerate(languages) if language == name]
        refs = [normalize(references[i], code) for i in clips]
        hyps = [normalize(texts[i], code) for i in clips]
        assert metrics[f"regression/wer/{code}"] == pytest.approx(jiwer.wer(refs, hyps))
    # language identification, one clip at a time with the stock model: argmax over the language tokens
    processor = load_processor(str(model_path))
    ids = language_token_ids(processor.tokenizer, whisper.config.vocab_size)
    assert len(ids) == 99  # every Whisper language (large-v3 has 100; this tokenizer 99)
    detected = []
    for item in regression_eval.dataset:
        features = torch.from_numpy(item["input_features"])[None]
        with torch.no_grad():
            logits = whisper(input_features=features, decoder_input_ids=torch.tensor([[50258]])).logits[0, -1]
        detected.append(ids[max(ids, key=lambda token: float(logits[token]))])
    right = sum(d == {"English": "en", "German": "de"}[name] for d, name in zip(detected, languages))
    assert metrics["regression/language_accuracy"] == right / len(languages)
    assert regression_eval.detected_languages(ORPOWhisper(whisper)) == dict(enumerate(detected))


def test_gradient_share_matches_separate_backward_passes_in_float64(model_dir, manifest):  # noqa: F811
    processor = load_processor(str(model_dir))
    whisper = WhisperForConditionalGeneration.from_pretrained(model_dir).double()
    tokens = WhisperTokens.for_model(processor.tokenizer, whisper.config)
    cfg = TrainConfig(train_data=str(manifest), report_to=[])
    from orpo.data.dataset import build_dataset

    dataset = build_dataset(cfg, "train", processor.feature_extractor, tokens)
    batch = PreferenceCollator(pad_token_id=tokens.eot)([dataset[i] for i in range(3)])
    batch["input_features"] = batch["input_features"].double()
    model = ORPOWhisper(whisper)
    alpha = 0.37
    share = gradient_share(model, batch, alpha, torch.autocast("cpu", enabled=False))

    def gradient(term: str) -> torch.Tensor:
        reference = copy.deepcopy(model)
        out = reference(batch)
        nll = out["nll_chosen"].mean()
        loss, _ = orpo_loss(out["logps_chosen"], out["logps_rejected"], out["rejected_mask"], out["nll_chosen"], alpha)
        (nll if term == "nll" else (loss - nll) / alpha).backward()
        return torch.cat([p.grad.reshape(-1) for p in reference.parameters() if p.grad is not None])

    grad_nll, grad_odds = gradient("nll"), gradient("odds")
    assert float(share["grad_norm/nll"]) == pytest.approx(float(grad_nll.norm()), rel=1e-9)
    assert float(share["grad_norm/odds_ratio"]) == pytest.approx(alpha * float(grad_odds.norm()), rel=1e-9)
    assert float(share["grad_share/odds_ratio"]) == pytest.approx(alpha * float(grad_odds.norm() / grad_nll.norm()))
    cosine = float(grad_nll @ grad_odds / (grad_nll.norm() * grad_odds.norm()))
    assert float(share["grad_cosine"]) == pytest.approx(cosine, rel=1e-9)
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradient behind


def test_logging_the_gradient_share_changes_nothing_in_training(model_dir, manifest, tmp_path):  # noqa: F811
    runs = {}
    for probe in (False, True):
        output_dir = tmp_path / f"probe-{probe}"
        train(
            TrainConfig(
                base_model=str(model_dir),
                train_data=str(manifest),
                output_dir=str(output_dir),
                max_steps=3,
                per_device_train_batch_size=2,
                logging_steps=1,
                log_grad_share=probe,
                report_to=[],
            )
        )
        runs[probe] = read_metrics(output_dir)
    shared = ("loss", "nll_loss", "log_odds_ratio", "grad_norm")
    assert [[r[k] for k in shared] for r in runs[False]] == [[r[k] for k in shared] for r in runs[True]]
    assert all(0 < r["grad_share/odds_ratio"] and -1 <= r["grad_cosine"] <= 1 for r in runs[True])
    figure = training_curves_figure(runs[True], "probe")
    assert "odds-ratio term's share of the gradient" in [ax.get_title() for ax in figure.axes if ax.get_visible()]
