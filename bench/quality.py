"""Quality table: does preference tuning beat plain fine-tuning? Base greedy and beam 5, plain fine-tuning
(``alpha: 0``), ORPO at alpha 0.1, 0.5 and 1.0, ORPO with its pairs refreshed from the model during training,
SimPO, and DPO with LoRA, trained on one preference set with the same data, steps and seed, scored on a held-out
test split and on a regression split of other speech.

    python bench/quality.py               # Whisper tiny.en: bench/QUALITY.md and bench/quality.png
    python bench/quality.py --model base  # the multilingual base, regression split in four languages:
                                          # bench/QUALITY-base.md and bench/quality-base.png

The preference set is built first if it is missing (``bench/quality_set.py``: espeak-ng speech, rejected
transcripts mined from tiny.en's own beam-search errors; for ``--model base`` they are therefore another model's
errors, which the report says). Every trained row evaluates every ``--eval-steps`` (test
WER, preference metrics, regression WER) and keeps the best checkpoint by test WER (``load_best_model_at_end``);
the ORPO rows log the odds-ratio term's share of the gradient (``log_grad_share``). Rows differ only in their
objective; the LoRA row also in its learning rate (``--lora-learning-rate``: adapters train at a higher rate).
Runs go to ``outputs/quality/<model>/<row>/``; ``--reuse`` reads finished runs instead of training them again,
and ``--rows`` trains only the named rows (the others must be finished runs).

Preference accuracy is the share of test pairs whose chosen transcript has the higher average log-prob, and
the margin their mean average-log-prob gap (``eval/preference/*``): neither depends on the objective, so every
row means the same thing. The WER
difference against plain fine-tuning comes with a 95% paired bootstrap interval over test clips: a row
"beats" plain fine-tuning only when the whole interval is below zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orpo.config import TrainConfig  # noqa: E402
from orpo.eval.text import wer_metrics  # noqa: E402
from orpo.files import staged_file, write_text_atomic  # noqa: E402
from orpo.train.logs import read_metrics  # noqa: E402
from orpo.train.loop import train  # noqa: E402


@dataclasses.dataclass(frozen=True, eq=False)  # rows key dicts by identity (their recipe is a dict)
class Row:
    """One trained row: its name in the table, its run folder, and the recipe keys it sets."""

    name: str
    folder: str
    recipe: dict


def trained_rows(args) -> list[Row]:
    """Plain fine-tuning first (the baseline every other row is compared with), then the preference objectives."""
    refresh = {"alpha": 0.5, "refresh_pairs_steps": args.refresh_steps, "refresh_num_rejected": 1}
    lora = {"loss_type": "dpo", "peft": "lora", "learning_rate": args.lora_learning_rate}
    return [
        Row("plain fine-tuning (alpha 0)", "alpha-0", {"alpha": 0.0}),
        Row("ORPO alpha 0.1", "alpha-0.1", {"alpha": 0.1}),
        Row("ORPO alpha 0.5", "alpha-0.5", {"alpha": 0.5}),
        Row("ORPO alpha 1", "alpha-1", {"alpha": 1.0}),
        Row(f"ORPO alpha 0.5, pairs refreshed every {args.refresh_steps} steps", "orpo-refresh", refresh),
        Row("SimPO (beta 2, gamma 0.5)", "simpo", {"loss_type": "simpo"}),
        Row(f"DPO (beta 0.1), LoRA r 32, lr {args.lora_learning_rate:g}", "dpo-lora", lora),
    ]


MODELS = {  # --model: (model folder, fetch name, data folder, builder flags, regression manifest, report name)
    "tiny.en": ("models/whisper-tiny.en", "tiny.en", "bench/quality-data", [], "regression.jsonl", "QUALITY"),
    "base": (
        "models/whisper-base",
        "base",
        "bench/quality-data",
        ["--multilingual"],
        "regression-multilingual.jsonl",
        "QUALITY-base",
    ),
}
BOOTSTRAP_SAMPLES = 2000
NLL_FREE = ("simpo", "dpo", "ipo")  # loss types with no NLL term on the chosen transcript


def prepare(args) -> tuple[Path, Path]:
    """The model folder and the data folder, fetched and built when missing."""
    model_dir, fetch_name, data_dir, flags, regression, _ = MODELS[args.model]
    model_dir, data_dir = ROOT / model_dir, ROOT / data_dir
    if not (model_dir / "config.json").is_file():
        subprocess.run(["whisper-orpo", "fetch-model", fetch_name, str(model_dir)], check=True)
    if not (data_dir / regression).is_file() or not (data_dir / "train.jsonl").is_file():
        subprocess.run([sys.executable, str(ROOT / "bench" / "quality_set.py"), *flags], check=True)
    return model_dir, data_dir


def recipe(args, model_dir: Path, data_dir: Path, row: Row, first: bool) -> TrainConfig:
    """One row's recipe: the shared settings, then the row's own keys (the first also evaluates the base model,
    greedy and with beam 5, which is the same for every row)."""
    orpo = row.recipe.get("loss_type", "orpo") == "orpo" and row.recipe.get("alpha", 0.1) > 0
    settings = dict(
        base_model=str(model_dir),
        language="English",
        train_data=str(data_dir / "train.jsonl"),
        test_data=str(data_dir / "test.jsonl"),
        regression_data=str(data_dir / MODELS[args.model][4]),
        output_dir=str(ROOT / "outputs" / "quality" / args.model / row.folder),
        overwrite_output_dir=True,
        learning_rate=args.learning_rate,
        warmup_steps=max(1, args.steps // 10),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=32,
        # The longest reference is about 25 tokens: 64 bounds a hallucinating beam without cutting any right one.
        generation_max_length=64,
        freeze_encoder=args.freeze_encoder,
        seed=args.seed,
        logging_steps=args.logging_steps,
        log_grad_share=orpo,
        eval_steps=args.eval_steps,
        save_steps=args.eval_steps,
        save_total_limit=1,
        load_best_model_at_end=True,
        eval_before_train=first,
        compare_num_beams=5 if first else 0,
        report_to=[],
    )
    return TrainConfig(**(settings | row.recipe))


def train_rows(args, model_dir: Path, data_dir: Path) -> dict[Row, Path]:
    """Train each row (or, with ``--reuse``, take a finished run; with ``--rows``, only those named); {row: run
    folder}."""
    runs = {}
    for k, row in enumerate(trained_rows(args)):
        cfg = recipe(args, model_dir, data_dir, row, first=k == 0)
        run = Path(cfg.output_dir)
        finished = (run / "eval_results.json").is_file()
        skip = (args.reuse and finished) or (args.rows and row.folder not in args.rows)
        if skip and not finished:
            raise SystemExit(f"{row.name}: no finished run in {run}; train it (leave it out of --rows)")
        if not skip:
            started = time.monotonic()
            train(cfg)
            seconds = time.monotonic() - started
            print(f"{row.name}: trained and evaluated in {seconds:.0f} s", flush=True)
            write_text_atomic(run / "bench_seconds.txt", f"{seconds:.0f}\n")
        runs[row] = run
    return runs


def measured_minutes(runs: dict[Row, Path]) -> str:
    """The time every row took when it was trained (kept beside each run, so ``--reuse`` reports it too)."""
    files = [run / "bench_seconds.txt" for run in runs.values()]
    if not all(f.is_file() for f in files):
        return "time not recorded for every row"
    return f"{sum(float(f.read_text()) for f in files) / 60:.0f} min of training and evaluation"


def clip_errors(samples: list[dict], key: str, spelling: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """Per clip: word errors and reference words of hypothesis ``key`` (corpus WER = sum / sum)."""
    from orpo.data.normalize import TextNormalizer

    normalize = TextNormalizer(spelling)
    errors, words = [], []
    for sample in samples:
        n = len(normalize(sample["reference"], sample["language"]).split())
        rate = wer_metrics([sample["reference"]], [sample[key]], [sample["language"]], spelling).get("wer", 0.0)
        errors.append(rate * n)
        words.append(n)
    return np.array(errors), np.array(words)


def paired_difference(a: tuple, b: tuple, seed: int) -> tuple[float, float, float]:
    """WER(a) - WER(b) on the same clips, with a 95% paired bootstrap interval over clips."""
    (errors_a, words), (errors_b, _) = a, b
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(words), size=(BOOTSTRAP_SAMPLES, len(words)))
    diffs = (errors_a[picks].sum(1) - errors_b[picks].sum(1)) / words[picks].sum(1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return (errors_a.sum() - errors_b.sum()) / words.sum(), float(low), float(high)


def run_summary(run: Path) -> dict:
    """What the table needs from one run folder: its results, its evaluations by step, its gradient share."""
    results = json.loads((run / "eval_results.json").read_text(encoding="utf-8"))
    records = read_metrics(run / "metrics.jsonl")
    evaluations = {r["step"]: r for r in records if "eval/wer" in r}
    shares = [r["grad_share/odds_ratio"] for r in records if "grad_share/odds_ratio" in r]
    cosines = [r["grad_cosine"] for r in records if "grad_cosine" in r]
    on_policy = [r["refresh/wer"] for r in records if "refresh/wer" in r]
    return {
        "results": results,
        "records": records,
        "last": evaluations[max(evaluations)],
        "grad_share": float(np.mean(shares)) if shares else None,
        "grad_cosine": float(np.mean(cosines)) if cosines else None,
        "on_policy": (on_policy[0], on_policy[-1]) if on_policy else None,
    }


def table_rows(runs: dict[Row, Path], spelling: dict | None, seed: int) -> list[dict]:
    """The rows: base greedy, base beam 5, then each trained row; WER differences against plain fine-tuning."""
    summaries = {row: run_summary(run) for row, run in runs.items()}
    plain_row = next(iter(summaries))
    base = summaries[plain_row]["results"]["base_metrics"]
    samples = {row: s["results"]["samples"] for row, s in summaries.items()}
    plain = clip_errors(samples[plain_row], "hypothesis", spelling)
    rows = []
    for name, key, beam_key in (
        ("base, greedy", "base_hypothesis", "eval/wer"),
        ("base, beam 5", "base_beam5_hypothesis", "eval/wer_beam5"),
    ):
        rows.append(
            {
                "model": name,
                "wer": base[beam_key],
                "vs_plain": paired_difference(clip_errors(samples[plain_row], key, spelling), plain, seed),
                "accuracy": base["eval/preference/accuracy"],
                "margin": base["eval/preference/margin"],
                "regression": base["regression/wer"],
                "nll": base["eval/nll_loss"],
            }
        )
    for row, summary in summaries.items():
        metrics, best = summary["results"]["metrics"], summary["results"]["best_model"]
        rows.append(
            {
                "model": row.name,
                "wer": metrics["eval/wer"],
                "last_wer": summary["last"]["eval/wer"],
                "last_margin": summary["last"]["eval/preference/margin"],
                "last_nll": summary["last"]["eval/nll_loss"],
                "nll_free": row.recipe.get("loss_type") in NLL_FREE,
                "vs_plain": None
                if row == plain_row
                else paired_difference(clip_errors(samples[row], "hypothesis", spelling), plain, seed),
                "accuracy": metrics["eval/preference/accuracy"],
                "margin": metrics["eval/preference/margin"],
                "regression": metrics["regression/wer"],
                "best_step": best["step"],
                "grad_share": summary["grad_share"],
                "grad_cosine": summary["grad_cosine"],
                "on_policy": summary["on_policy"],
            }
        )
    return rows


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(rows: list[dict]) -> str:
    header = (
        "| model | test WER (best model) | test WER (last step) | vs plain fine-tuning, 95% CI | preference accuracy "
        "| log-prob margin | regression WER | best step | odds-ratio grad share | grad cosine "
        "| on-policy training WER, first → last refresh |"
    )
    lines = [header, "|---|" + "---:|" * 10]
    for row in rows:
        diff = row["vs_plain"]
        vs = "-" if diff is None else f"{100 * diff[0]:+.2f} pts [{100 * diff[1]:+.2f}, {100 * diff[2]:+.2f}]"
        cells = [
            row["model"],
            _cell(row["wer"], "{:.2%}"),
            _cell(row.get("last_wer"), "{:.2%}"),
            vs,
            _cell(row["accuracy"], "{:.3f}"),
            _cell(row["margin"], "{:+.4f}"),
            _cell(row["regression"], "{:.2%}"),
            _cell(row.get("best_step"), "{}"),
            _cell(row.get("grad_share"), "{:.3f}"),
            _cell(row.get("grad_cosine"), "{:+.3f}"),
            _cell(row.get("on_policy"), "{0[0]:.2%} → {0[1]:.2%}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """One honest sentence per tuned row against plain fine-tuning, on each column."""
    plain = next(r for r in rows if r["model"].startswith("plain"))
    sentences = []
    for row in rows:
        if row["model"].startswith(("base", "plain")):
            continue
        diff, low, high = row["vs_plain"]
        if high < 0:
            wer = f"lower test WER ({100 * diff:+.2f} points, interval below zero)"
        elif low > 0:
            wer = f"HIGHER test WER ({100 * diff:+.2f} points, interval above zero)"
        else:
            wer = f"test WER within noise ({100 * diff:+.2f} points, interval [{100 * low:+.2f}, {100 * high:+.2f}])"
        accuracy = "higher" if row["accuracy"] > plain["accuracy"] else "not higher"
        regression = row["regression"] - plain["regression"]
        sentence = (
            f"- **{row['model']}** against plain fine-tuning: {wer}; preference accuracy {accuracy} "
            f"({row['accuracy']:.3f} vs {plain['accuracy']:.3f}); regression WER {100 * regression:+.2f} points"
        )
        if row.get("grad_share") is not None:
            sentence += (
                f"; the odds-ratio term made {row['grad_share']:.2f}x the NLL's gradient norm on average "
                f"(cosine {row['grad_cosine']:+.2f})"
            )
        if row.get("on_policy") is not None:
            first, last = row["on_policy"]
            sentence += f"; its own WER on the training clips it re-decoded went {first:.2%} → {last:.2%}"
        sentences.append(sentence + ".")
    return sentences


COLUMNS = (  # (row key, column name, the better end)
    ("wer", "test WER (best model)", min),
    ("last_wer", "test WER (last step)", min),
    ("accuracy", "preference accuracy", max),
    ("margin", "log-prob margin", max),
    ("regression", "regression WER", min),
)


def winners(rows: list[dict]) -> str:
    """Which trained row is best on each column (every row tied at the table's precision named)."""
    trained = [r for r in rows if not r["model"].startswith("base")]
    parts = []
    for key, column, better in COLUMNS:
        best = better(r[key] for r in trained)
        tied = [r["model"] for r in trained if abs(r[key] - best) < 5e-5]
        parts.append(f"{column}: {' = '.join(tied)}")
    return "**Best trained row per column.** " + "; ".join(parts) + "."


def why(rows: list[dict]) -> str:
    """What the logged metrics say about the result: how big the odds-ratio term's push was, how much of it plain
    fine-tuning already gives, and what the objectives without an NLL term did to the chosen transcript."""
    base = rows[0]
    plain = next(r for r in rows if r["model"].startswith("plain"))
    fixed = [r for r in rows if r.get("grad_share") is not None and r.get("on_policy") is None]
    shares = ", ".join(f"{r['grad_share']:.2f}x at {r['model'].removeprefix('ORPO ')}" for r in fixed)
    cosines = [r["grad_cosine"] for r in fixed]
    text = (
        f"**Why the rows end where they do.** With fixed pairs the odds-ratio term's gradient averaged {shares} "
        f"the NLL's norm (logged every logging step on one micro-batch), at a mean cosine of {min(cosines):+.2f} to "
        f"{max(cosines):+.2f} with the NLL's gradient: much of its push points the way the NLL already pushes. "
        f"Plain fine-tuning, which never sees a rejected transcript, takes preference accuracy from "
        f"{base['accuracy']:.2f} (the base model prefers its own errors) to {plain['accuracy']:.2f}: raising the "
        "chosen transcript's likelihood already lowers the rejected one's on this set, so the odds-ratio term has "
        "little left to add at small alpha, and the larger alphas show what a bigger share of the update does."
    )
    for row in rows:
        if row.get("on_policy") is not None and row.get("grad_share") is not None:
            text += (
                f" With pairs refreshed ({row['model']}) the term's share stays at {row['grad_share']:.2f}x: the "
                "new rejected transcripts are the model's current near-misses, so the preference term never runs "
                f"out of signal; where plain fine-tuning already reaches {plain['wer']:.2%}, that push did not "
                "lower test WER further."
            )
    text += without_nll(base, plain, rows)
    return text


def without_nll(base: dict, plain: dict, rows: list[dict]) -> str:
    """The objectives with no NLL term (SimPO, DPO): their margin widens while the chosen transcript's own
    likelihood falls, the likelihood displacement the DPO literature reports."""
    others = [r for r in rows if "last_margin" in r and not r.get("nll_free")]
    rows = [r for r in rows if r.get("nll_free")]
    if not rows:
        return ""
    widest = min(r["last_margin"] for r in rows) > max(r["last_margin"] for r in others)
    each = "; ".join(
        f"{r['model']} margin {r['last_margin']:+.2f}, NLL {r['last_nll']:.3f}, test WER {r['last_wer']:.0%}"
        for r in rows
    )
    rose = all(r["last_nll"] > base["nll"] for r in rows)
    runs_on = all(r["last_wer"] > 1 for r in rows)
    return (
        "\n\n**The objectives without an NLL term.** SimPO and DPO only ask that the chosen transcript beat the "
        "rejected one; nothing holds the chosen transcript's own likelihood up. By the last step their held-out "
        f"log-prob margin is {'the widest of all rows' if widest else 'wide'} while the chosen transcript's NLL per "
        f"token {'rose above' if rose else 'ended against'} the base model's {base['nll']:.3f}: {each} (plain "
        f"fine-tuning: margin {plain['last_margin']:+.2f}, NLL {plain['last_nll']:.3f}). "
        + ("Both transcripts fell, the rejected faster. " if rose else "")
        + ("Greedy decoding then runs on past the speech (a WER above 100% is insertions). " if runs_on else "")
        + "This is the likelihood displacement reported for DPO (Pal et al. 2024, DPO-Positive; Razin et al. "
        "2024); ORPO and CPO keep an NLL term against it. Their best "
        "models are the early checkpoints the selection kept; a smaller learning rate or beta may serve them "
        "better, but every row here holds the same settings."
    )


def plot(runs: dict[Row, Path], path: Path) -> None:
    """Test WER, regression WER and the odds-ratio gradient share against step, one line per row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, PercentFormatter

    from orpo.train.plots import series

    fig = Figure(figsize=(16, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for k, (row, run) in enumerate(runs.items()):
        records = read_metrics(run / "metrics.jsonl")
        color = f"C{k}"  # one colour per row in every panel
        for ax, key in zip(axes[:2], ("eval/wer", "regression/wer")):
            ax.plot(*series(records, key), marker="o", color=color, label=row.name)
        if series(records, "grad_share/odds_ratio")[0]:
            axes[2].plot(*series(records, "grad_share/odds_ratio"), color=color, label=row.name)
    titles = (
        "test WER (greedy, log scale)",
        "regression WER (greedy, log scale)",
        "|alpha grad L_OR| / |grad NLL| (log_grad_share)",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("optimizer step (0: base model)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[:2]:  # log scale: rows a word apart near 3% stay apart beside a run above 100%
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
        ax.yaxis.set_minor_formatter(PercentFormatter(1.0, decimals=0))
    axes[2].set_yscale("log")
    with staged_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def rejected_counts(data_dir: Path) -> str:
    """How many rejected transcripts of the training and test pairs the model made, and how many a rule made."""
    records = [json.loads(line) for name in ("train.jsonl", "test.jsonl") for line in open(data_dir / name)]
    from_model = sum(r.get("rejected_from") == "model" for r in records)
    return f"{from_model} of {len(records)} from the model, {len(records) - from_model} by rule"


def test_words(data_dir: Path) -> int:
    return sum(len(json.loads(line)["chosen"].split()) for line in open(data_dir / "test.jsonl"))


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def write_report(args, rows: list[dict], data_dir: Path, took: str, picture: str) -> None:
    """bench/QUALITY.md: command, machine, date, time, the set, the table, the verdicts and the plot."""
    counts = {
        name: sum(1 for _ in open(data_dir / name)) for name in ("train.jsonl", "test.jsonl", MODELS[args.model][4])
    }
    # --reuse only reads the runs back: the results are those of the command without it
    command = " ".join(["python bench/quality.py", *(a for a in sys.argv[1:] if a != "--reuse")])
    text = "\n".join(
        [
            "# Quality: ORPO and other preference objectives against plain fine-tuning and beam search",
            "",
            f"Measured {datetime.date.today().isoformat()} on {machine()}, {took}: `{command}`.",
            "",
            f"Whisper {args.model}; {counts['train.jsonl']} training pairs, {counts['test.jsonl']} test pairs, "
            f"{counts[MODELS[args.model][4]]} regression clips (`bench/quality_set.py`). {args.steps} optimizer steps "
            f"of {args.batch} clips, learning rate {args.learning_rate:g} (linear, warmup), seed {args.seed}, "
            f"{'encoder frozen, ' if args.freeze_encoder else ''}evaluated every {args.eval_steps} steps; the best "
            "checkpoint by test WER is the final model; transcripts of at most 64 tokens. Every row: same data, "
            "steps, hyperparameters and seed; only its objective differs (the LoRA row trains adapters, at learning "
            f"rate {args.lora_learning_rate:g}). The refresh row re-decodes every training clip with beam 5 every "
            f"{args.refresh_steps} steps; the model's best wrong hypothesis becomes the clip's rejected transcript.",
            "",
            "**What this set is, and is not**: synthetic speech (espeak-ng voices and speeds, with noise and gain), "
            "everyday English sentences, rejected transcripts mined from Whisper tiny.en's own beam-search errors "
            f"({rejected_counts(data_dir)}; rule-made ASR-style errors where it made none). It is not a "
            f"benchmark of real recordings; one word of the test split is {100 / test_words(data_dir):.2f} WER points.",
            "",
            format_table(rows),
            "",
            *verdicts(rows),
            "",
            winners(rows),
            "",
            why(rows),
            "",
            f"![test WER, regression WER and gradient share against step]({picture})",
            "",
        ]
    )
    write_text_atomic(ROOT / "bench" / f"{MODELS[args.model][5]}.md", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny.en", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument(
        "--train-encoder",
        dest="freeze_encoder",
        action="store_false",
        help="train the encoder too (by default only the decoder trains: half the time on a CPU)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--refresh-steps", type=int, default=20, help="the refresh row's refresh_pairs_steps")
    parser.add_argument("--lora-learning-rate", type=float, default=2e-4, help="the DPO row's (LoRA) learning rate")
    parser.add_argument(
        "--rows", nargs="+", metavar="FOLDER", help="train only these rows (e.g. orpo-refresh simpo dpo-lora)"
    )
    parser.add_argument("--reuse", action="store_true", help="read finished runs instead of training them again")
    args = parser.parse_args()
    model_dir, data_dir = prepare(args)
    runs = train_rows(args, model_dir, data_dir)
    from transformers import WhisperTokenizer

    spelling = getattr(WhisperTokenizer.from_pretrained(model_dir), "english_spelling_normalizer", None)
    rows = table_rows(runs, spelling, args.seed)
    print(format_table(rows), *verdicts(rows), sep="\n")
    picture = f"{MODELS[args.model][5].lower()}.png"
    plot(runs, ROOT / "bench" / picture)
    write_report(args, rows, data_dir, measured_minutes(runs), picture)


if __name__ == "__main__":
    main()
