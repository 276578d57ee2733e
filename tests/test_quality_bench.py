"""bench/quality.py's statistics and wording: the WER difference against plain fine-tuning and its paired bootstrap
interval, checked against jiwer on whole sets, and verdicts that never claim a win inside the noise; and
bench/quality_set.py's sentences and rule-made errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jiwer
import numpy as np

from orpo.data.normalize import TextNormalizer

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
quality = importlib.util.module_from_spec(spec)
sys.modules["quality"] = quality  # a dataclass looks its module up there
spec.loader.exec_module(quality)


def samples(references: list[str], hypotheses: list[str]) -> list[dict]:
    return [{"reference": r, "hypothesis": h, "language": "en"} for r, h in zip(references, hypotheses)]


def test_the_paired_difference_is_the_corpus_wer_difference_and_its_interval_holds_it():
    rng = np.random.default_rng(7)
    words = "the cat sat on a mat by two red doors near our house".split()
    references = [" ".join(rng.choice(words, size=rng.integers(4, 10))) for _ in range(40)]

    def corrupt(text: str, p: float) -> str:
        return " ".join(w if rng.random() > p else rng.choice(words) for w in text.split())

    a, b = [corrupt(r, 0.3) for r in references], [corrupt(r, 0.1) for r in references]
    errors_a = quality.clip_errors(samples(references, a), "hypothesis", None)
    errors_b = quality.clip_errors(samples(references, b), "hypothesis", None)
    diff, low, high = quality.paired_difference(errors_a, errors_b, seed=0)
    normalize = TextNormalizer()
    refs = [normalize(r, "en") for r in references]
    expected = jiwer.wer(refs, [normalize(h, "en") for h in a]) - jiwer.wer(refs, [normalize(h, "en") for h in b])
    assert abs(diff - expected) < 1e-12
    assert low < diff < high and low > 0  # 30% against 10% noise on 40 clips: clearly worse
    same = quality.paired_difference(errors_a, errors_a, seed=0)
    assert same == (0.0, 0.0, 0.0)


def test_verdicts_say_within_noise_unless_the_whole_interval_is_on_one_side():
    plain = {"model": "plain fine-tuning (alpha 0)", "accuracy": 0.8, "regression": 0.1, "vs_plain": None}

    def orpo(alpha, interval):
        return {
            "model": f"ORPO alpha {alpha}",
            "vs_plain": interval,
            "accuracy": 0.9,
            "regression": 0.12,
            "grad_share": 0.2,
            "grad_cosine": 0.5,
        }

    simpo = {"model": "SimPO (beta 2, gamma 0.5)", "vs_plain": (0.0, -0.01, 0.01), "accuracy": 0.7, "regression": 0.1}
    refreshed = orpo(0.5, (0.0, -0.01, 0.01)) | {"model": "ORPO alpha 0.5, refreshed", "on_policy": (0.2, 0.05)}
    rows = [plain, orpo(0.1, (-0.01, -0.02, 0.005)), orpo(0.5, (-0.02, -0.03, -0.01)), orpo(1.0, (0.02, 0.01, 0.03))]
    said = quality.verdicts(rows + [simpo, refreshed])
    assert "within noise" in said[0] and "lower test WER" not in said[0]
    assert "lower test WER" in said[1]
    assert "HIGHER test WER" in said[2]
    assert all("regression WER +2.00 points" in sentence for sentence in said[:3])
    assert "preference accuracy not higher (0.700 vs 0.800)" in said[3] and "gradient" not in said[3]
    assert "20.00% → 5.00%" in said[4]


def test_the_quality_set_sentences_are_distinct_and_every_rule_error_reads_differently():
    sys.path.insert(0, str(ROOT / "bench"))
    import quality_set

    splits = quality_set.sentences()
    assert [len(splits[s]) for s in ("train", "test")] == [quality_set.SIZES["train"], quality_set.SIZES["test"]]
    assert not set(splits["train"]) & set(splits["test"])
    assert len(set(splits["train"])) == len(splits["train"])
    assert quality_set.sentences() == splits  # reproducible
    normalize = TextNormalizer()
    for line, text in enumerate(splits["train"] + splits["test"], start=1):
        error = quality_set.rule_error(text, seed=line)
        assert normalize(error, "en") != normalize(text, "en"), text
        assert error == quality_set.rule_error(text, seed=line)


def test_every_row_trains_once_into_its_own_folder_and_reuse_reads_finished_runs(tmp_path, monkeypatch):
    trained = []

    def fake_train(cfg):
        trained.append(cfg)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "eval_results.json").write_text("{}")

    monkeypatch.setattr(quality, "train", fake_train)
    monkeypatch.setattr(quality, "ROOT", tmp_path)
    args = quality.argparse.Namespace(
        model="tiny.en",
        steps=60,
        eval_steps=20,
        logging_steps=10,
        batch=8,
        learning_rate=2e-5,
        freeze_encoder=True,
        seed=42,
        refresh_steps=20,
        lora_learning_rate=2e-4,
        reuse=False,
        rows=None,
    )
    runs = quality.train_rows(args, tmp_path / "model", tmp_path / "data")
    names = [row.name for row in runs]
    assert names[0].startswith("plain") and len(runs) == 7 and len({run for run in runs.values()}) == 7
    by_folder = {Path(cfg.output_dir).name: cfg for cfg in trained}
    assert by_folder["alpha-0"].alpha == 0 and by_folder["alpha-0"].eval_before_train
    assert by_folder["orpo-refresh"].refresh_pairs_steps == 20 and by_folder["orpo-refresh"].log_grad_share
    assert by_folder["simpo"].loss_type == "simpo" and not by_folder["simpo"].log_grad_share
    assert by_folder["dpo-lora"].peft == "lora" and by_folder["dpo-lora"].learning_rate == 2e-4
    trained.clear()
    args.reuse = True
    assert list(quality.train_rows(args, tmp_path / "model", tmp_path / "data").values()) == list(runs.values())
    assert trained == [], "--reuse trained a finished row again"
