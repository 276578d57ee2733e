"""orpo/evaluate.py: normalised WER/CER, batched generation from the training prefix, reports and the command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SENTENCES, write_manifest

from orpo.data.collate import GenerationCollator, PreferenceCollator
from orpo.data.dataset import PreferenceDataset
from orpo.data.manifest import read_manifest
from orpo.data.spelling import english_spelling_mapping
from orpo.data.tokens import WhisperTokens
from orpo.eval.generate import generate_transcripts
from orpo.eval.report import format_comparison, write_eval_results
from orpo.eval.text import CER_LANGUAGES, uses_cer, wer_metrics
from orpo.eval.wer import WerEvaluator, generation_loader
from orpo.evaluate import main

# ---------------------------------------------------------------------------------------------------------
# Error rates


def test_english_normalisation_ignores_case_punctuation_spelling_and_contractions():
    references = ["The colour of the car, isn't it?", "Mr. Smith paid $20."]
    hypotheses = ["the color of the car is not it", "mister smith paid 20 dollars"]
    assert wer_metrics(references, hypotheses, ["English", "en"]) == {"wer": 0.0}


def test_english_spelling_table_is_whispers():
    mapping = english_spelling_mapping()
    assert len(mapping) > 1700
    assert mapping["colour"] == "color" and mapping["favourite"] == "favorite"


def test_wer_is_corpus_level_edits_over_reference_words():
    # 1 substitution in 4 words, 1 deletion in 2 words, 1 insertion in 2 words: 3 edits / 8 words.
    references = ["the cat sat down", "hello world", "good morning"]
    hypotheses = ["the cat sat town", "hello", "good morning all"]
    metrics = wer_metrics(references, hypotheses, [None] * 3)
    assert metrics == {"wer": pytest.approx(3 / 8)}


def test_empty_hypothesis_and_empty_reference():
    assert wer_metrics(["one two"], [""], ["en"]) == {"wer": 1.0}
    # A reference that normalises to nothing ("um") counts the hypothesis words as insertions.
    assert wer_metrics(["um", "a b"], ["x", "a b"], ["en", "en"]) == {"wer": pytest.approx(1 / 2)}
    assert wer_metrics(["um"], [""], ["en"]) == {}  # no reference word: no rate


@pytest.mark.parametrize("language", ["Chinese", "zh", "Japanese", "th", "yue", "Korean", "my", "km", "lo"])
def test_languages_without_spaces_use_cer(language):
    assert uses_cer(language)


def test_cer_ignores_spaces_and_punctuation():
    assert wer_metrics(["你好，世界。"], ["你好 世界"], ["Chinese"]) == {"cer": 0.0}
    assert wer_metrics(["你好世界"], ["你好是界"], ["zh"]) == {"cer": pytest.approx(0.25)}


def test_mixed_languages_report_wer_and_cer_separately():
    metrics = wer_metrics(["guten Tag", "今日は"], ["guten tag!", "今日わ"], ["German", "Japanese"])
    assert metrics == {"wer": 0.0, "cer": pytest.approx(1 / 3)}
    assert "de" not in CER_LANGUAGES and not uses_cer("German") and not uses_cer(None)


def test_basic_normaliser_for_other_languages_keeps_diacritics():
    assert wer_metrics(["Der Bär läuft."], ["der bar lauft"], ["German"]) == {"wer": pytest.approx(2 / 3)}


def test_wer_metrics_checks_lengths():
    with pytest.raises(ValueError):
        wer_metrics(["a"], ["a", "b"], ["en"])


# ---------------------------------------------------------------------------------------------------------
# Generation


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    return WhisperForConditionalGeneration.from_pretrained(tiny_model_dir).eval(), WhisperProcessor.from_pretrained(
        tiny_model_dir
    )


def make_dataset(processor, manifest, language=None, timestamps=False):
    tokens = WhisperTokens(processor.tokenizer, True, "transcribe", timestamps, 448)
    return PreferenceDataset(read_manifest(manifest), processor.feature_extractor, tokens, language, 0, 30)


def test_generation_collator_gives_each_clip_its_training_prefix(tiny, tmp_path):
    _, processor = tiny
    manifest = write_manifest(tmp_path / "data", count=2, language="German")
    dataset = make_dataset(processor, manifest)
    collator = GenerationCollator(dataset)
    batch = collator([dataset[0], dataset[1]])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["decoder_input_ids"][0].tolist())
    assert tokens == ["<|startoftranscript|>", "<|de|>", "<|transcribe|>", "<|notimestamps|>"]
    assert batch["sample_index"].tolist() == [0, 1]
    assert batch["input_features"].shape == (2, 80, 3000)


def test_generated_transcripts_do_not_depend_on_batching(tiny, tmp_path):
    from accelerate import Accelerator

    model, processor = tiny
    dataset = make_dataset(processor, write_manifest(tmp_path / "data", count=5), language="en")
    accelerator = Accelerator(cpu=True)
    texts = {}
    for batch_size in (1, 3):
        loader = accelerator.prepare(generation_loader(dataset, batch_size))
        texts[batch_size] = generate_transcripts(model, loader, accelerator, processor.tokenizer, max_length=12)
    assert list(texts[1]) == [0, 1, 2, 3, 4]
    assert texts[1] == texts[3]
    assert all(isinstance(t, str) for t in texts[1].values())
    assert not model.training


def test_generation_matches_plain_greedy_decoding(tiny, tmp_path):
    """The transcript is the argmax chain from the training prefix (checked step by step)."""
    model, processor = tiny
    dataset = make_dataset(processor, write_manifest(tmp_path / "data", count=1), language="en")
    loader = generation_loader(dataset, 1)
    batch = next(iter(loader))
    max_length = 10
    ids = batch["decoder_input_ids"]
    suppress = set(model.generation_config.suppress_tokens or [])
    begin_suppress = set(model.generation_config.begin_suppress_tokens or [])
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        while ids.shape[1] < max_length:
            logits = model(input_features=batch["input_features"], decoder_input_ids=ids).logits[0, -1]
            banned = suppress | (begin_suppress if ids.shape[1] == batch["decoder_input_ids"].shape[1] else set())
            logits[list(banned)] = -math.inf
            token = int(logits.argmax())
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token == eos:
                break
    expected = processor.tokenizer.decode(ids[0, 4:], skip_special_tokens=True).strip()
    texts = generate_transcripts(model, loader, None, processor.tokenizer, max_length=max_length)
    assert texts == {0: expected}


def test_generation_puts_back_each_module_training_mode(tiny_model_dir, tmp_path):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from orpo.model.orpo_whisper import ORPOWhisper

    processor = WhisperProcessor.from_pretrained(tiny_model_dir)
    model = ORPOWhisper(WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)).train()
    model.whisper.model.encoder.eval()  # a module a trainer keeps in eval mode stays so
    dataset = make_dataset(processor, write_manifest(tmp_path / "data", count=1), language="en")
    generate_transcripts(model, generation_loader(dataset, 1), None, processor.tokenizer, max_length=6)
    assert model.training and model.whisper.model.decoder.training
    assert not model.whisper.model.encoder.training


def test_beam_search_runs(tiny, tmp_path):
    model, processor = tiny
    dataset = make_dataset(processor, write_manifest(tmp_path / "data", count=2), language="en")
    loader = generation_loader(dataset, 2)
    texts = generate_transcripts(model, loader, None, processor.tokenizer, num_beams=3, max_length=8)
    assert sorted(texts) == [0, 1]


def test_wer_evaluator_scores_generated_text_and_keeps_samples(tiny, tmp_path, monkeypatch):
    from accelerate import Accelerator

    import orpo.eval.wer as wer

    model, processor = tiny
    manifest = write_manifest(tmp_path / "data", count=2, language=None)
    dataset = make_dataset(processor, manifest, language="English")
    evaluator = WerEvaluator(dataset, Accelerator(cpu=True), batch_size=2, max_length=8)
    assert evaluator.languages == ["en"] * 2  # from the prefix's language token: no field in the manifest

    # Perfect transcripts (the chosen text, in other case and punctuation) score 0; the base's score the edits.
    perfect = {i: SENTENCES[i][0].upper() + "." for i in range(2)}
    monkeypatch.setattr(wer, "generate_transcripts", lambda *args, **kwargs: dict(perfect))
    assert evaluator(model) == {"eval/wer": 0.0}
    wrong = {i: SENTENCES[i][0].rsplit(" ", 1)[0] for i in range(2)}  # the last word left out of each
    monkeypatch.setattr(wer, "generate_transcripts", lambda *args, **kwargs: dict(wrong))
    words = sum(len(SENTENCES[i][0].split()) for i in range(2))
    assert evaluator(model, tag="base") == {"eval/wer": pytest.approx(2 / words)}
    rows = evaluator.samples()
    assert rows[0]["reference"] == SENTENCES[0][0]
    assert rows[0]["hypothesis"] == perfect[0] and rows[0]["base_hypothesis"] == wrong[0]
    assert rows[0]["language"] == "en" and rows[0]["audio"].endswith(".wav")


def test_wer_evaluator_real_generation(tiny, tmp_path):
    from accelerate import Accelerator

    model, processor = tiny
    dataset = make_dataset(processor, write_manifest(tmp_path / "data", count=2), language="en")
    metrics = WerEvaluator(dataset, Accelerator(cpu=True), max_length=8)(model)
    assert set(metrics) == {"eval/wer"} and metrics["eval/wer"] >= 0


# ---------------------------------------------------------------------------------------------------------
# Reports


BASE = {"eval/loss": 0.7114, "eval/rewards/accuracies": 0.7, "eval/rewards/margins": 0.0351, "eval/wer": 0.2159}
TUNED = {"eval/loss": 0.4484, "eval/rewards/accuracies": 0.8, "eval/rewards/margins": 0.0552, "eval/wer": 0.1477}


def test_comparison_table():
    table = format_comparison(BASE, TUNED)
    lines = table.splitlines()
    assert lines[0].split("|")[1:5] == [" metric             ", "   base ", "  tuned ", "    change "]
    assert "| WER " in lines[2] and "21.59%" in lines[2] and "14.77%" in lines[2] and "-6.82 pts" in lines[2]
    assert any("eval/loss" in line and "-0.2630" in line for line in lines)
    assert any("rewards/accuracies" in line and "+0.1000" in line for line in lines)
    assert not any("CER" in line for line in lines)  # no CER on either side: no row
    assert len({len(line) for line in lines}) == 1  # aligned


def test_comparison_table_without_base_and_without_prefix():
    table = format_comparison(None, {"wer": 0.25, "cer": 0.1, "loss": 1.5})
    assert "25.00%" in table and "10.00%" in table and "1.5000" in table and "base" not in table


def test_write_eval_results(tmp_path):
    path = write_eval_results(
        tmp_path / "out",
        {**TUNED, "eval/cer": float("nan")},
        base=BASE,
        samples=[{"reference": "a", "hypothesis": "b"}],
    )
    assert path == tmp_path / "out" / "eval_results.json"
    data = json.loads(path.read_text())
    assert data["metrics"]["eval/wer"] == TUNED["eval/wer"] and data["metrics"]["eval/cer"] is None
    assert data["base_metrics"] == BASE
    assert any("WER" in line for line in data["comparison"])
    assert data["samples"] == [{"reference": "a", "hypothesis": "b"}]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_logged_base_results_for_a_resumed_run(tmp_path):
    from orpo.train.logs import logged_base_results

    assert logged_base_results(tmp_path) is None
    lines = [{"step": 0, **BASE}, {"step": 2, "loss": 0.5}, {"step": 2, **TUNED}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert logged_base_results(tmp_path) == BASE


# ---------------------------------------------------------------------------------------------------------
# Command line


def direct_preference_metrics(whisper, processor, manifest, alpha):
    from orpo.loss.orpo import orpo_loss
    from orpo.model.orpo_whisper import ORPOWhisper

    tokens = WhisperTokens(processor.tokenizer, True, "transcribe", False, 448)
    dataset = PreferenceDataset(read_manifest(manifest), processor.feature_extractor, tokens, None, 0, 30)
    batch = PreferenceCollator(tokens.eot)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        out = ORPOWhisper(whisper.eval())(batch)
        _, per_clip = orpo_loss(
            out["logps_chosen"], out["logps_rejected"], out["rejected_mask"], out["nll_chosen"], alpha
        )
    return {f"eval/{k}": v.mean().item() for k, v in per_clip.items()}


def test_command_on_a_model_dir(tiny, tiny_model_dir, tmp_path, capsys):
    model, processor = tiny
    manifest = write_manifest(tmp_path / "data", count=3)
    out = tmp_path / "results" / "r.json"
    assert (
        main(
            [
                "--model",
                str(tiny_model_dir),
                "--data",
                str(manifest),
                "--batch_size",
                "2",
                "--max_length",
                "8",
                "--alpha",
                "0.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| WER" in printed and "eval/loss" in printed and "rewards/margins" in printed
    data = json.loads(out.read_text())
    expected = direct_preference_metrics(model, processor, manifest, 0.5)
    for name in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/nll_loss"):
        assert data["metrics"][name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name
    assert "eval/wer" in data["metrics"]
    assert len(data["samples"]) == 3 and data["samples"][0]["reference"] == SENTENCES[0][0]
    assert data["alpha"] == 0.5 and data["num_beams"] == 1


def test_command_on_a_peft_adapter_dir(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    torch.manual_seed(0)
    peft_model = get_peft_model(
        WhisperForConditionalGeneration.from_pretrained(tiny_model_dir),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"]),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero adapter
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload()

    manifest = write_manifest(tmp_path / "data", count=2)
    out = tmp_path / "r.json"
    assert main(["--model", str(adapter_dir), "--data", str(manifest), "--max_length", "6", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["model_source"].startswith("adapter")
    expected = direct_preference_metrics(merged, WhisperProcessor.from_pretrained(tiny_model_dir), manifest, 0.1)
    base = direct_preference_metrics(
        WhisperForConditionalGeneration.from_pretrained(tiny_model_dir),
        WhisperProcessor.from_pretrained(tiny_model_dir),
        manifest,
        0.1,
    )
    assert data["metrics"]["eval/loss"] == pytest.approx(expected["eval/loss"], rel=1e-5)
    assert data["metrics"]["eval/loss"] != pytest.approx(base["eval/loss"], rel=1e-3)  # the adapter was applied


def test_command_rejects_a_bad_manifest_before_loading(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": {"path": "missing.wav"}, "chosen": "a", "rejected": "b"}\n')
    (tmp_path / "no-model").mkdir()  # a folder holding no model: loading it would fail
    assert main(["--model", str(tmp_path / "no-model"), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}:1: field 'audio.path'" in err and "missing.wav" in err
    assert "no-model" not in err  # no attempt to load the model was made


# ---------------------------------------------------------------------------------------------------------
# Slow: two processes, and real tiny.en weights


@pytest.mark.slow
def test_two_processes_give_the_same_results_as_one(tiny_model_dir, tmp_path):
    """Each process transcribes and scores its shard; 5 clips over 2 processes in batches of 2 (so padded)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    manifest = write_manifest(tmp_path / "data", count=5)
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"r{processes}.json"
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29533",
        ] + (["--multi_gpu"] if processes > 1 else [])
        command += [
            "-m",
            "orpo.evaluate",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(manifest),
            "--batch_size",
            "2",
            "--max_length",
            "10",
            "--out",
            str(out),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        results[processes] = json.loads(out.read_text())
    one, two = results[1], results[2]
    assert [s["hypothesis"] for s in one["samples"]] == [s["hypothesis"] for s in two["samples"]]
    assert len(two["samples"]) == 5
    assert set(one["metrics"]) == set(two["metrics"])
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


@pytest.fixture(scope="module")
def demo_subset(tmp_path_factory):
    """The first 4 clips of examples/demo/test.jsonl, with absolute audio paths."""
    from conftest import ROOT

    folder = tmp_path_factory.mktemp("demo-subset")
    lines = (ROOT / "examples/demo/test.jsonl").read_text().splitlines()[:4]
    records = []
    for line in lines:
        record = json.loads(line)
        record["audio"]["path"] = str(ROOT / "examples/demo" / record["audio"]["path"])
        records.append(json.dumps(record))
    path = folder / "test4.jsonl"
    path.write_text("\n".join(records) + "\n")
    return path


@pytest.mark.slow
def test_tiny_en_on_the_demo_test_set(tiny_en_dir, tmp_path):
    """Real Whisper tiny.en (English-only: no language or task token) on the first 10 demo test clips, greedy."""
    from conftest import ROOT

    records = []
    for line in (ROOT / "examples/demo/test.jsonl").read_text().splitlines()[:10]:
        record = json.loads(line)
        record["audio"]["path"] = str(ROOT / "examples/demo" / record["audio"]["path"])
        records.append(json.dumps(record))
    data_path = tmp_path / "test10.jsonl"
    data_path.write_text("\n".join(records) + "\n")
    out = tmp_path / "tiny-en.json"
    assert main(["--model", str(tiny_en_dir), "--data", str(data_path), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    # Measured: 21.6% greedy (19 edits in 88 words), eval loss 0.711 with alpha 0.1.
    assert 0.12 < data["metrics"]["eval/wer"] < 0.32
    assert data["metrics"]["eval/loss"] == pytest.approx(0.711, abs=0.02)
    first = data["samples"][0]
    assert first["hypothesis"] == "The mail usually arrives just before lunch."
    assert all(s["language"] == "en" for s in data["samples"])


@pytest.mark.slow
def test_beam_search_matches_the_asr_pipeline(tiny_en_dir, demo_subset, tmp_path):
    """The ASR pipeline decodes with 5 beams by default; so does --num_beams 5, to the same text."""
    from transformers import pipeline

    from orpo.data.audio import SAMPLE_RATE, load_audio

    out = tmp_path / "beam.json"
    assert main(["--model", str(tiny_en_dir), "--data", str(demo_subset), "--num_beams", "5", "--out", str(out)]) == 0
    samples = json.loads(out.read_text())["samples"]
    asr = pipeline("automatic-speech-recognition", model=str(tiny_en_dir))
    for sample in samples:
        expected = asr({"raw": load_audio(sample["audio"]), "sampling_rate": SAMPLE_RATE})["text"].strip()
        assert sample["hypothesis"] == expected
