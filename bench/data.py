"""Data-path benchmark: how the trainer's data path scales with the number of manifest lines, side by side in one run.

    python bench/data.py                          # 10k, 100k and 1M lines; prints the tables
    python bench/data.py --write-results          # and appends them to bench/RESULTS.md
    python bench/data.py --lines 2000 --seconds 2 # a quick look

A synthetic manifest of N lines points at the real speech clips of the repository (``examples/demo*``, and
``bench/quality-data`` when built); every line has its own transcripts (so tokenising is not flattered by repeats).
Measured, each in a fresh child process (peak RSS from ``getrusage``):

* **cold check**: the whole manifest checked into the index (``orpo.data.index``: JSON, fields, audio, tokens) with
  ``--num-proc`` processes, and cached; the child's peak RSS and its largest check worker's, and the cache's size
  on disk;
* **warm start**: the same again, read back from the cache (what a second run, and every other process of a run,
  does), and the training dataset built on it: time and peak RSS per process;
* **time to first batch**: from the warm start to the first batch out of a DataLoader with 2 workers;
* **loader throughput** per worker (one worker, batches of 8): clips/s with log-mel features computed in the
  worker (``features_on_device: false``) and with raw audio handed on (``true``), and what computing the log-mel
  of those clips then costs the training process on this CPU; from it, the workers needed to feed
  ``--target`` clips/s.

The audio decode of the cold check covers the few hundred distinct files once each (a file several lines name is
decoded once); a corpus of distinct files pays the measured per-file decode time for each, which the report
states. Needs models/whisper-tiny.en (its tokenizer and feature extractor; ``bash scripts/setup.sh``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = ROOT / "models" / "whisper-tiny.en"
WORDS = "the a cat dog sat ran on under mat map red blue house river light left right two to meet met write".split()


def speech_clips() -> list[Path]:
    """The repository's real speech clips (and the quality set's, when it has been built)."""
    folders = [ROOT / "examples" / "demo" / "audio", ROOT / "examples" / "demo-de" / "audio"]
    folders.append(ROOT / "bench" / "quality-data" / "audio")
    return sorted(path for folder in folders if folder.is_dir() for path in folder.rglob("*.flac"))


def write_manifest(path: Path, lines: int, clips: list[Path]) -> None:
    """``lines`` records over ``clips`` in turn, each with its own chosen and rejected transcript."""
    import random

    rng = random.Random(lines)
    with path.open("w") as f:
        for i in range(lines):
            words = [WORDS[rng.randrange(len(WORDS))] for _ in range(rng.randint(6, 14))] + [str(i)]
            rejected = list(words)
            rejected[rng.randrange(len(words) - 1)] = "wrong"
            record = {"audio": str(clips[i % len(clips)]), "chosen": " ".join(words), "rejected": " ".join(rejected)}
            f.write(json.dumps(record) + "\n")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tokens_and_processor():
    from transformers import WhisperConfig, WhisperProcessor

    from orpo.data.tokens import WhisperTokens

    processor = WhisperProcessor.from_pretrained(MODEL)
    return WhisperTokens.for_model(processor.tokenizer, WhisperConfig.from_pretrained(MODEL)), processor


def child_index(manifest: str, cache: str, num_proc: int) -> dict:
    """One check or warm start in this (child) process, and the training dataset on it."""
    from orpo.data.dataset import PreferenceDataset
    from orpo.data.index import load_index

    tokens, processor = tokens_and_processor()
    imports = peak_rss_mib()  # torch, transformers, the tokenizer: every process pays these anyway
    started = time.monotonic()
    index = load_index(manifest, tokens, None, 0.1, index_cache_dir=cache, num_proc=num_proc)
    dataset = PreferenceDataset(index, processor.feature_extractor, tokens, None, 0.0, 30.0)
    seconds = time.monotonic() - started
    # the check's worker processes (num_proc, above 20,000 lines) have ended: the largest one's peak
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "seconds": seconds,
        "clips": len(dataset),
        "imports_rss_mib": imports,
        "peak_rss_mib": peak_rss_mib(),
        "worker_peak_rss_mib": workers,
    }


def child_first_batch(manifest: str, cache: str) -> dict:
    """Warm start to the first batch of a 2-worker DataLoader."""
    from torch.utils.data import DataLoader

    from orpo.data.collate import PreferenceCollator
    from orpo.data.dataset import PreferenceDataset
    from orpo.data.index import load_index

    tokens, processor = tokens_and_processor()
    started = time.monotonic()
    index = load_index(manifest, tokens, None, 0.1, index_cache_dir=cache)
    dataset = PreferenceDataset(index, processor.feature_extractor, tokens, None, 0.0, 30.0)
    loader = DataLoader(dataset, 8, shuffle=True, num_workers=2, collate_fn=PreferenceCollator(tokens.eot))
    next(iter(loader))
    return {"seconds": time.monotonic() - started, "peak_rss_mib": peak_rss_mib()}


def child_throughput(manifest: str, cache: str, raw_audio: bool, seconds: float) -> dict:
    """Clips/s of one DataLoader worker, after its first batch (the training process only takes the batches); with
    raw audio, then the training process's cost of the log-mel of such batches (on this CPU, one thread)."""
    import torch
    from torch.utils.data import DataLoader

    from orpo.data.collate import PreferenceCollator
    from orpo.data.dataset import PreferenceDataset
    from orpo.data.index import load_index
    from orpo.model.log_mel import LogMel

    torch.set_num_threads(1)
    tokens, processor = tokens_and_processor()
    index = load_index(manifest, tokens, None, 0.1, index_cache_dir=cache)
    dataset = PreferenceDataset(index, processor.feature_extractor, tokens, None, 0.0, 30.0, raw_audio=raw_audio)
    loader = iter(DataLoader(dataset, 8, shuffle=True, num_workers=1, collate_fn=PreferenceCollator(tokens.eot)))
    batch = next(loader)
    clips, started = 0, time.monotonic()
    for later in loader:  # until the time is up, or the manifest's end
        clips += len(later["sample_index"])
        if time.monotonic() - started >= seconds:
            break
    result = {"clips_per_s": clips / (time.monotonic() - started)}
    if raw_audio:
        log_mel = LogMel(processor.feature_extractor)
        log_mel(batch["input_audio"])  # warm-up
        started = time.monotonic()
        for _ in range(5):
            log_mel(batch["input_audio"])
        result["log_mel_ms_per_clip"] = 1000 * (time.monotonic() - started) / (5 * len(batch["input_audio"]))
    return result


def child_decode_ms(clips: list[str]) -> dict:
    """Milliseconds to decode one clip in full (the cold check's per-file cost), over the distinct clips."""
    from orpo.data.audio import audio_duration

    started = time.monotonic()
    for clip in clips:
        audio_duration(Path(clip))
    return {"ms_per_file": 1000 * (time.monotonic() - started) / len(clips)}


def in_child(function: str, **kwargs) -> dict:
    """Run ``function(**kwargs)`` of this file in a fresh Python process; its JSON result."""
    command = [sys.executable, __file__, "--child", json.dumps({"function": function, "kwargs": kwargs})]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{function} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def run(args) -> dict:
    clips = speech_clips()
    report = {"distinct_clips": len(clips), "rows": []}
    report["decode"] = in_child("child_decode_ms", clips=[str(c) for c in clips])
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for lines in args.lines:
            manifest, cache = scratch / f"lines-{lines}.jsonl", scratch / f"cache-{lines}"
            write_manifest(manifest, lines, clips)
            cold = in_child("child_index", manifest=str(manifest), cache=str(cache), num_proc=args.num_proc)
            warm = in_child("child_index", manifest=str(manifest), cache=str(cache), num_proc=args.num_proc)
            first = in_child("child_first_batch", manifest=str(manifest), cache=str(cache))
            row = {"lines": lines, "manifest_mib": manifest.stat().st_size / 2**20, "cache_mib": folder_mib(cache)}
            report["rows"].append(row | {"cold": cold, "warm": warm, "first_batch": first})
            print(json.dumps(report["rows"][-1]), flush=True)
        smallest = scratch / f"lines-{args.lines[0]}.jsonl"
        cache = str(scratch / f"cache-{args.lines[0]}")
        report["throughput"] = {
            mode: in_child("child_throughput", manifest=str(smallest), cache=cache, raw_audio=raw, seconds=args.seconds)
            for mode, raw in (("host features", False), ("raw audio", True))
        }
    return report


def tables(report: dict, args) -> str:
    lines = [
        "| manifest lines | manifest MiB | cold check s | cold peak RSS MiB (+ over imports) "
        "| largest check worker's peak RSS MiB | cache MiB "
        "| warm start s | warm peak RSS MiB per process (+ over imports) | warm start to first batch s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        cold, warm, first = row["cold"], row["warm"], row["first_batch"]
        cold_extra, warm_extra = (r["peak_rss_mib"] - r["imports_rss_mib"] for r in (cold, warm))
        workers = f"{cold['worker_peak_rss_mib']:,.0f}" if cold["worker_peak_rss_mib"] else "- (in process)"
        lines.append(
            f"| {row['lines']:,} | {row['manifest_mib']:.1f} | {cold['seconds']:.1f} | {cold['peak_rss_mib']:,.0f} "
            f"(+{cold_extra:,.0f}) | {workers} | {row['cache_mib']:.1f} | {warm['seconds']:.2f} "
            f"| {warm['peak_rss_mib']:,.0f} "
            f"(+{warm_extra:,.0f}) | {first['seconds']:.2f} |"
        )
    host, raw = report["throughput"]["host features"], report["throughput"]["raw audio"]
    workers = {name: -(-args.target // t["clips_per_s"]) for name, t in report["throughput"].items()}
    lines += [
        "",
        "| loader (one worker, batches of 8) | clips/s per worker | workers for "
        f"{args.target:g} clips/s | log-mel in the training process, ms per clip (this CPU) |",
        "|---|---:|---:|---:|",
        f"| log-mel in the worker (`features_on_device: false`) | {host['clips_per_s']:.1f} | "
        f"{workers['host features']:.0f} | - |",
        f"| raw audio to the device (`features_on_device: true`) | {raw['clips_per_s']:.1f} | "
        f"{workers['raw audio']:.0f} | {raw['log_mel_ms_per_clip']:.1f} |",
    ]
    return "\n".join(lines)


def growth(report: dict) -> str:
    """How time and memory per process grow from the smallest manifest to the largest (the issue's bar: time
    linear or better, memory per process sub-linear), and whether the largest warm start stays under 10 s."""
    first, last = report["rows"][0], report["rows"][-1]
    factor = last["lines"] / first["lines"]
    cold = last["cold"]["seconds"] / first["cold"]["seconds"]
    warm = last["warm"]["seconds"] / first["warm"]["seconds"]
    # RSS over the imports; a rise under 1 MiB counts as 1 MiB (the small manifests barely move it)
    memory = [max(r["warm"]["peak_rss_mib"] - r["warm"]["imports_rss_mib"], 1.0) for r in (first, last)]
    seconds = last["warm"]["seconds"]
    return (
        f"Growth from {first['lines']:,} to {last['lines']:,} lines (x{factor:g}): cold check time "
        f"x{cold:.1f} ({'linear or better' if cold <= 1.1 * factor else 'WORSE than linear'}), warm start time "
        f"x{warm:.1f}, warm peak RSS over the imports per process {memory[0]:,.0f} -> {memory[1]:,.0f} MiB "
        f"(x{memory[1] / memory[0]:.1f}: {'sub-linear' if memory[1] < factor * memory[0] else 'NOT sub-linear'}; "
        "the index is memory-mapped, so its pages are read on access and shared by the processes of a node). "
        f"The warm start of the {last['lines']:,}-line manifest took {seconds:.1f} s "
        f"({'under' if seconds < 10 else 'OVER'} the 10 s a second run may take on this machine)."
    )


def write_results(report: dict, args, table: str) -> None:
    import torch

    from orpo.files import write_text_atomic

    command = "python bench/data.py " + " ".join(a for a in sys.argv[1:])
    machine = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    section = (
        f"## {datetime.date.today().isoformat()}: data path, {machine}\n\n`{command}` ({report['distinct_clips']} "
        f"distinct speech clips behind every manifest; decoding one in full takes "
        f"{report['decode']['ms_per_file']:.1f} ms)\n\n{table}\n\n{growth(report)}\n"
    )
    path = ROOT / "bench" / "RESULTS.md"
    write_text_atomic(path, path.read_text().rstrip() + "\n\n" + section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="processes of the cold check")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each loader throughput is measured")
    parser.add_argument("--target", type=float, default=40.0, help="clips/s a training step consumes")
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        call = json.loads(args.child)
        print(json.dumps(globals()[call["function"]](**call["kwargs"])))
        return
    if not (MODEL / "config.json").is_file():
        raise SystemExit(f"{MODEL} is missing: bash scripts/setup.sh (or whisper-orpo fetch-model tiny.en {MODEL})")
    report = run(args)
    table = tables(report, args)
    print(table, growth(report), sep="\n\n")
    if args.write_results:
        write_results(report, args, table)


if __name__ == "__main__":
    main()
