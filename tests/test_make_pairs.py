"""orpo.make_pairs: preference pairs from plain ASR data with the model's own n-best mistakes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import ROOT, write_clip

from orpo.data.dataset import PreferenceDataset
from orpo.data.manifest import read_asr_manifest, read_manifest
from orpo.data.tokens import WhisperTokens
from orpo.errors import ManifestError
from orpo.eval.nbest import Scorer
from orpo.make_pairs import main
from orpo.pairs.make_pairs import NBestDecoder, make_pairs, skipped_path

EOT, SOT, EN, DE, TRANSCRIBE, NO_TIMESTAMPS = 50257, 50258, 50259, 50261, 50359, 50363


def write_asr(
    folder: Path,
    texts: list[str],
    languages: list[str | None] | None = None,
    key: str = "text",
    name: str = "asr.jsonl",
    seconds: list[float] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, text in enumerate(texts):
        duration = seconds[i] if seconds else 1.0
        write_clip(folder / f"clip{i}.wav", duration, seed=i)
        record = {"audio": {"path": f"clip{i}.wav"}, "duration": duration, key: text, "speaker": f"s{i}"}
        if languages and languages[i]:
            record["language"] = languages[i]
        lines.append(json.dumps(record))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


class FakeDecoder:
    """Returns the n-best list given for each clip (by file name), and records what it was asked."""

    def __init__(self, nbest: dict[str, list[str]], fail_after_batches: int | None = None):
        self.nbest = nbest
        self.calls: list[tuple[list[str], list[int]]] = []
        self.fail_after_batches = fail_after_batches

    def __call__(self, samples, prefix):
        if self.fail_after_batches is not None and len(self.calls) == self.fail_after_batches:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append(([s.audio_path.name for s in samples], prefix))
        return [self.nbest[s.audio_path.name] for s in samples]


def english_tokens(processor, multilingual=False) -> WhisperTokens:
    return WhisperTokens(
        processor.tokenizer, multilingual=multilingual, task="transcribe", timestamps=False, max_length=448
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


REFERENCES = ["Hello, world!", "The cat sat on the mat.", "We have four dogs.", "Good morning."]
NBEST = {
    "clip0.wav": ["hello world", "Hello world.", "Hallo world", "hallo, world!", "Yellow world"],
    "clip1.wav": ["The cat sat on the map.", "The cat sat on the mat.", "The cat sad on the mat."],
    "clip2.wav": ["We have 4 dogs.", "We have four dogs", "We have for dogs."],
    "clip3.wav": ["Good morning.", "good morning", "Good Morning!"],  # all correct: skipped
}


# ---------------------------------------------------------------------------------------------------------
# The ASR manifest reader


def test_read_asr_manifest(tmp_path):
    path = write_asr(tmp_path, ["one", "two"], languages=["German", None])
    extra = json.dumps({"audio": {"path": "clip0.wav"}, "sentence": " three "})
    path.write_text(path.read_text() + "\n" + extra + "\n")
    samples = read_asr_manifest(path)
    assert [s.text for s in samples] == ["one", "two", "three"]
    assert [s.line for s in samples] == [1, 2, 4]
    assert [s.source for s in samples] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    assert samples[0].language == "German" and samples[1].language is None
    assert samples[0].record["speaker"] == "s0" and samples[0].duration == pytest.approx(1.0)


@pytest.mark.parametrize(
    "record, field",
    [
        ({"audio": {"path": "clip0.wav"}, "chosen": "x"}, "'text' is missing"),
        ({"audio": {"path": "clip0.wav"}, "text": "  "}, "'text' must be a non-empty string"),
        ({"audio": {"path": "clip0.wav"}, "sentence": 3}, "'sentence' must be a non-empty string"),
        ({"audio": {"path": "nope.wav"}, "text": "x"}, "'audio.path'"),
        ({"audio": {"path": "clip0.wav"}, "text": "x", "language": "Klingon"}, "'language'"),
    ],
)
def test_bad_asr_line_names_file_line_and_field(tmp_path, record, field):
    path = write_asr(tmp_path, ["fine"])
    path.write_text(path.read_text() + json.dumps(record) + "\n")
    with pytest.raises(ManifestError, match=rf"^{re.escape(str(path))}:2: field {field}"):
        read_asr_manifest(path)


# ---------------------------------------------------------------------------------------------------------
# Choosing the rejected hypotheses


def test_pairs_are_the_best_wrong_hypotheses_after_normalisation(tmp_path, processor):
    asr = write_asr(tmp_path / "data", REFERENCES)
    out = tmp_path / "out" / "pairs.jsonl"
    decoder = FakeDecoder(NBEST)
    summary = make_pairs(read_asr_manifest(asr), out, decoder, english_tokens(processor), batch_size=3, progress=False)
    pairs = read_jsonl(out)
    assert [p["source_line"] for p in pairs] == [1, 2, 3]
    # case and punctuation are not mistakes; "4" and "four" are the same after EnglishTextNormalizer
    assert [p["rejected"] for p in pairs] == ["Hallo world", "The cat sat on the map.", "We have for dogs."]
    assert [p["chosen"] for p in pairs] == REFERENCES[:3]
    assert [p["wer"] for p in pairs] == [0.0, pytest.approx(1 / 6, abs=1e-6), 0.0]  # of the best hypothesis
    assert pairs[0]["speaker"] == "s0" and "text" not in pairs[0] and pairs[0]["duration"] == 1.0
    assert (out.parent / pairs[0]["audio"]["path"]).resolve() == (asr.parent / "clip0.wav").resolve()
    skipped = read_jsonl(skipped_path(out))
    assert [s["source_line"] for s in skipped] == [4] and skipped[0]["wer"] == 0.0
    assert skipped[0]["reason"] == "every hypothesis equals the reference" and skipped[0]["best"] == "Good morning."
    assert (summary.clips, summary.pairs, summary.skipped, summary.decoded) == (4, 3, 1, 4)
    assert summary.mean_wer == pytest.approx((1 / 6) / 4)
    assert "clips: 4, pairs written: 3, skipped: 1, mean WER: 4.17%" in summary.line()
    # English-only model: <|startoftranscript|><|notimestamps|>, batches of 3 then 1
    assert decoder.calls == [
        (["clip0.wav", "clip1.wav", "clip2.wav"], [SOT, NO_TIMESTAMPS]),
        (["clip3.wav"], [SOT, NO_TIMESTAMPS]),
    ]

    # the trainer reads the output as it is
    samples = read_manifest(out)
    dataset = PreferenceDataset(samples, processor.feature_extractor, english_tokens(processor), None, 0.0, 30.0)
    assert len(dataset) == 3 and [s.rejected for s in samples] == [[p["rejected"]] for p in pairs]


def test_several_rejected_are_distinct_and_written_as_a_list(tmp_path, processor):
    asr = write_asr(tmp_path, REFERENCES)
    out = tmp_path / "pairs.jsonl"
    make_pairs(
        read_asr_manifest(asr), out, FakeDecoder(NBEST), english_tokens(processor), num_rejected=3, progress=False
    )
    pairs = read_jsonl(out)
    assert pairs[0]["rejected"] == ["Hallo world", "Yellow world"]  # "hallo, world!" is "Hallo world" again
    assert pairs[1]["rejected"] == ["The cat sat on the map.", "The cat sad on the mat."]
    assert pairs[2]["rejected"] == ["We have for dogs."]  # a list even with one, since K > 1
    samples = read_manifest(out)
    assert [len(s.rejected) for s in samples] == [2, 2, 1]
    dataset = PreferenceDataset(samples, processor.feature_extractor, english_tokens(processor), None, 0.0, 30.0)
    assert [len(item.segments) for item in dataset.items] == [3, 3, 2]


def test_multilingual_prefix_language_and_basic_normaliser(tmp_path, processor):
    asr = write_asr(
        tmp_path, ["Wir haben vier Hunde.", "Hello, world!", "Guten Morgen."], languages=["German", "English", None]
    )
    nbest = {
        "clip0.wav": ["Wir haben 4 Hunde.", "wir haben vier hunde"],  # BasicTextNormalizer: 4 != vier
        "clip1.wav": ["hello world", "Yellow world"],
        "clip2.wav": ["Guten Morgen!", "Gute Morgen."],
    }
    decoder = FakeDecoder(nbest)
    out = tmp_path / "pairs.jsonl"
    make_pairs(
        read_asr_manifest(asr),
        out,
        decoder,
        english_tokens(processor, multilingual=True),
        default_language="de",
        batch_size=8,
        progress=False,
    )
    # a batch never mixes languages: each has its own decoder prefix
    assert decoder.calls == [
        (["clip0.wav"], [SOT, DE, TRANSCRIBE, NO_TIMESTAMPS]),
        (["clip1.wav"], [SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]),
        (["clip2.wav"], [SOT, DE, TRANSCRIBE, NO_TIMESTAMPS]),
    ]
    pairs = read_jsonl(out)
    assert [p["rejected"] for p in pairs] == ["Wir haben 4 Hunde.", "Yellow world", "Gute Morgen."]
    assert [p["language"] for p in pairs] == ["German", "English", "de"]  # the forced language is written


def test_clips_longer_than_30_s_are_listed_not_decoded(tmp_path, processor):
    asr = write_asr(tmp_path, ["short one", "long one"], seconds=[1.0, 31.0])
    decoder = FakeDecoder({"clip0.wav": ["short won"]})
    out = tmp_path / "pairs.jsonl"
    summary = make_pairs(read_asr_manifest(asr), out, decoder, english_tokens(processor), progress=False)
    assert [names for names, _ in decoder.calls] == [["clip0.wav"]]
    assert (summary.pairs, summary.skipped, summary.too_long) == (1, 0, 1)
    assert "too long (> 30 s, not decoded): 1" in summary.line()
    (skipped,) = read_jsonl(skipped_path(out))
    assert skipped["source_line"] == 2 and "30 s" in skipped["reason"] and "wer" not in skipped
    assert summary.mean_wer == pytest.approx(0.5)  # over decoded clips only


def test_multilingual_without_language_names_the_line(tmp_path, processor):
    asr = write_asr(tmp_path, ["a", "b"], languages=["en", None])
    with pytest.raises(ManifestError, match=rf"^{re.escape(str(asr))}:2: field 'language' is missing"):
        make_pairs(
            read_asr_manifest(asr),
            tmp_path / "p.jsonl",
            FakeDecoder({}),
            english_tokens(processor, multilingual=True),
            progress=False,
        )


# ---------------------------------------------------------------------------------------------------------
# Resuming


def test_resume_after_a_crash_with_a_truncated_last_line(tmp_path, processor):
    texts = [f"sentence number {i}" for i in range(7)]
    nbest = {
        f"clip{i}.wav": [f"sentence number {i}", f"sentence numb {i}"] if i != 4 else [f"sentence number {i}"]
        for i in range(7)
    }
    asr = write_asr(tmp_path / "data", texts)
    samples = read_asr_manifest(asr)
    tokens = english_tokens(processor)

    whole = tmp_path / "whole.jsonl"
    make_pairs(samples, whole, FakeDecoder(nbest), tokens, batch_size=2, progress=False)

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):  # crash after two batches (4 clips)
        make_pairs(samples, out, FakeDecoder(nbest, fail_after_batches=2), tokens, batch_size=2, progress=False)
    assert [r["source_line"] for r in read_jsonl(out)] == [1, 2, 3, 4]
    with out.open("a") as f:  # the crash also cut a record in half
        f.write('{"audio": {"path": "data/clip4.wav"}, "chosen": "sente')

    decoder = FakeDecoder(nbest)
    summary = make_pairs(samples, out, decoder, tokens, batch_size=2, progress=False)
    assert [names for names, _ in decoder.calls] == [["clip4.wav", "clip5.wav"], ["clip6.wav"]]  # only the rest
    assert out.read_text() == whole.read_text()  # same records, same order
    assert skipped_path(out).read_text() == skipped_path(whole).read_text()
    assert (summary.clips, summary.pairs, summary.skipped, summary.resumed, summary.decoded) == (7, 6, 1, 4, 3)

    # a finished output: nothing left to decode
    decoder = FakeDecoder(nbest)
    assert make_pairs(samples, out, decoder, tokens, progress=False).decoded == 0 and decoder.calls == []

    # a last record complete but without its newline is kept, and the file stays valid JSON Lines
    text = whole.read_text()
    cut = tmp_path / "cut.jsonl"
    cut.write_text(text[:-1])
    skipped_path(cut).write_text(skipped_path(whole).read_text())
    assert make_pairs(samples, cut, FakeDecoder(nbest), tokens, progress=False).decoded == 0
    assert cut.read_text() == text


def test_resume_refuses_output_from_other_data(tmp_path, processor):
    asr = write_asr(tmp_path / "a", ["one", "two"])
    other = write_asr(tmp_path / "b", ["one", "two"])
    out = tmp_path / "pairs.jsonl"
    nbest = {"clip0.wav": ["won"], "clip1.wav": ["too"]}
    make_pairs(read_asr_manifest(asr), out, FakeDecoder(nbest), english_tokens(processor), progress=False)
    with pytest.raises(ManifestError, match="made from other data"):
        make_pairs(read_asr_manifest(other), out, FakeDecoder(nbest), english_tokens(processor), progress=False)
    (tmp_path / "garbage.jsonl").write_text('{"no": "source line"}\n')
    with pytest.raises(ManifestError, match="written by orpo.make_pairs"):
        make_pairs(
            read_asr_manifest(asr),
            tmp_path / "garbage.jsonl",
            FakeDecoder(nbest),
            english_tokens(processor),
            progress=False,
        )


def test_scorer_error_rates():
    scorer = Scorer()
    assert scorer.error_rate("The cat sat.", "the cat sat", None) == ("wer", 0.0)
    assert scorer.error_rate("a b c d", "a x c", "en") == ("wer", 0.5)
    kind, rate = scorer.error_rate("我们走吧", "我们走", "zh")
    assert kind == "cer" and rate == pytest.approx(0.25)
    assert scorer.wrong_hypotheses("Hi there", ["hi there", "", "  ", "Hi, where?", "hi where"], None, 5) == [
        "Hi, where?"
    ]
    # EnglishTextNormalizer leaves a stray "." from "..."; it is not a mistake
    assert scorer.wrong_hypotheses("Call my name.", ["Call my name...", "Call my name…", "Call me name."], "en", 5) == [
        "Call me name."
    ]
    assert scorer.error_rate("Call my name.", "Call my name...", "en") == ("wer", 0.0)


# ---------------------------------------------------------------------------------------------------------
# Real beam search


def test_nbest_decoder_and_command_line_on_a_tiny_random_model(tmp_path, tiny_model_dir, processor, capsys):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    asr = write_asr(tmp_path / "data", ["the cat sat", "on the mat", "hello world"])
    model = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
    decoder = NBestDecoder(model, WhisperProcessor.from_pretrained(tiny_model_dir), num_beams=3, max_new_tokens=4)
    samples = read_asr_manifest(asr)
    prefix = [SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]
    nbest = decoder(samples[:2], prefix)
    assert len(nbest) == 2 and all(len(hyps) == 3 and all(isinstance(h, str) for h in hyps) for hyps in nbest)
    assert len(set(nbest[0])) > 1 or not any(nbest[0])  # a real n-best list, not one hypothesis three times

    out = tmp_path / "out" / "pairs.jsonl"
    argv = [
        "--model",
        str(tiny_model_dir),
        "--data",
        str(asr),
        "--out",
        str(out),
        "--num_beams",
        "3",
        "--num_rejected",
        "2",
        "--batch_size",
        "2",
        "--language",
        "English",
        "--max_new_tokens",
        "4",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    pairs = read_jsonl(out)
    skipped = read_jsonl(skipped_path(out)) if skipped_path(out).exists() else []
    assert len(pairs) + len(skipped) == 3
    assert f"clips: 3, pairs written: {len(pairs)}, skipped: {len(skipped)}, mean WER:" in printed
    assert pairs  # a random model's hypotheses are wrong
    tokens = WhisperTokens(processor.tokenizer, True, "transcribe", False, 448)
    dataset = PreferenceDataset(read_manifest(out), processor.feature_extractor, tokens, None, 0.0, 30.0)
    assert len(dataset) == len(pairs) and all(isinstance(p["rejected"], list) for p in pairs)
    assert all(p["language"] == "English" for p in pairs)  # the forced language is written for the trainer

    assert main(argv) == 0  # rerun: everything is done already
    assert "decoded now: 0, resumed: 3" in capsys.readouterr().out
    assert main(argv[:-4] + ["--num_rejected", "9"]) == 2  # more rejected than beams: a clear error
    assert "command line (--num_beams): num_beams (3) must be at least num_rejected (9)" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_set_with_real_tiny_en_gives_a_manifest_the_trainer_accepts(tiny_en_dir, tmp_path, capsys):
    """The acceptance check: make-pairs on the bundled demo clips ("chosen" as "text"), then the trainer's own
    build_datasets reads the result as it is."""
    from transformers import WhisperConfig, WhisperProcessor

    from orpo.config import TrainConfig
    from orpo.data.dataset import build_datasets

    demo = ROOT / "examples" / "demo"
    lines = []
    for line in (demo / "test.jsonl").read_text().splitlines()[:10]:  # the 10 clips the figures below are from
        record = json.loads(line)
        record["audio"]["path"] = str(demo / record["audio"]["path"])
        record["text"] = record.pop("chosen")
        del record["rejected"]
        lines.append(json.dumps(record))
    asr = tmp_path / "asr.jsonl"
    asr.write_text("\n".join(lines) + "\n")
    out = tmp_path / "pairs.jsonl"
    assert (
        main(
            [
                "--model",
                str(tiny_en_dir),
                "--data",
                str(asr),
                "--out",
                str(out),
                "--num_beams",
                "4",
                "--batch_size",
                "5",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    pairs = read_jsonl(out)
    skipped = read_jsonl(skipped_path(out)) if skipped_path(out).exists() else []
    assert len(pairs) + len(skipped) == 10 and len(pairs) >= 5
    assert f"clips: 10, pairs written: {len(pairs)}, skipped: {len(skipped)}" in printed
    scorer = Scorer()
    for p in pairs:
        assert isinstance(p["rejected"], str)
        assert scorer.normalize(p["rejected"], None) != scorer.normalize(p["chosen"], None)
        assert 0.0 <= p["wer"] <= 1.5
    mean_wer = sum(r["wer"] for r in pairs + skipped) / 10
    assert mean_wer < 0.5  # tiny.en reads espeak speech well; the pairs are near misses, not noise

    processor = WhisperProcessor.from_pretrained(tiny_en_dir)
    cfg = TrainConfig(base_model=str(tiny_en_dir), train_data=str(out), test_data=str(out), language="English")
    train_set, test_set, _ = build_datasets(cfg, processor, WhisperConfig.from_pretrained(tiny_en_dir))
    assert len(train_set) == len(pairs) and len(test_set) == len(pairs)
    assert train_set[0]["input_features"].shape == (80, 3000)
