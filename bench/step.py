"""ORPO step benchmark: our one-pass step against the two-pass reference, side by side in one run.

    python bench/step.py --model-size small --batch 1 --rejected 1 2 4 --tokens 40
    python bench/step.py --model-size small --batch 1 --tokens 40 120 220
    python bench/step.py --model-size small large-v3 --batch 1 4 --device cuda --dtype bfloat16

Randomly initialised Whisper models of the real shapes, 30 s clips (3000 mel frames), a chosen
transcript of ``--tokens`` tokens and K rejected ones (``--rejected``) of 3, 6, … tokens fewer, after
the 4-token prefix. Every variant runs on identical inputs. Measured per variant:

* activation memory, once (it does not vary): bytes kept for backward (parameters and inputs excluded)
  through saved-tensor hooks (``orpo.model.recompute.observe_saved_tensors``); with ``--profile-memory``
  on CPU also the bytes still allocated after the forward (torch profiler, an independent count); on
  CUDA ``torch.cuda.max_memory_allocated`` over the step. Beside it the analytic floor of the shape
  (``bench/floor.py``);
* step time (forward + backward) in strictly alternating repeats, two-pass, one-pass, …, two-pass, …:
  the median and the spread, and per repeat the ratio to the two-pass step of the same round, beside the
  ratio of FLOPs counted from the config (``bench/floor.py``);
* the loss, which must equal the reference's;
* the process's in-use heap after each repeat (glibc ``mallinfo2``, or CUDA's allocated bytes): the
  benchmark stops with an error if it grows, since a leak would distort every later measurement.

Prints a table and, last, one line of JSON with the ratios (ours / two-pass) per setting;
``--write-results`` also appends the table to bench/RESULTS.md with the command above it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from floor import Shape, Step, activation_floor_bytes, step_flops  # noqa: E402

from orpo.data.collate import PreferenceCollator  # noqa: E402
from orpo.loss.objective import Objective  # noqa: E402
from orpo.model.orpo_whisper import ORPOWhisper  # noqa: E402
from orpo.model.recompute import SavedBytes, observe_saved_tensors  # noqa: E402
from orpo.model.reference import two_pass_forward  # noqa: E402

ORPO = Objective(alpha=0.1)  # the objective every measured step computes

SHAPES = {  # d_model, layers, heads, ffn, mel bins, vocabulary
    "test": Shape(64, 2, 2, 256, 80, 51865),  # for the tests and dry runs: seconds on a CPU
    "tiny": Shape(384, 4, 6, 1536, 80, 51865),
    "base": Shape(512, 6, 8, 2048, 80, 51865),
    "small": Shape(768, 12, 12, 3072, 80, 51865),
    "medium": Shape(1024, 24, 16, 4096, 80, 51865),
    "large-v3": Shape(1280, 32, 20, 5120, 128, 51866),
}
EOT, SOT, EN, TRANSCRIBE, NO_TIMESTAMPS = 50257, 50258, 50259, 50359, 50363
VARIANTS = [
    "two-pass",
    "one-pass",
    "one-pass+selective",
    "one-pass+freeze_encoder",
    "one-pass+checkpointing",
    "two-pass+checkpointing",
]
HEAP_GROWTH_LIMIT = 0.25  # of one step's saved bytes, over all repeats of a setting


def build_model(size: str, device: str, dtype: torch.dtype) -> WhisperForConditionalGeneration:
    shape = SHAPES[size]
    config = WhisperConfig(
        vocab_size=shape.vocab,
        d_model=shape.d_model,
        encoder_layers=shape.layers,
        decoder_layers=shape.layers,
        encoder_attention_heads=shape.heads,
        decoder_attention_heads=shape.heads,
        encoder_ffn_dim=shape.ffn,
        decoder_ffn_dim=shape.ffn,
        num_mel_bins=shape.mels,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(config).to(device=device, dtype=dtype).train()


def rejected_lengths(tokens: int, rejected: int) -> list[int]:
    """K rejected transcripts, 3, 6, … tokens shorter than the chosen one."""
    return [tokens - 3 * k for k in range(1, rejected + 1)]


def build_batch(
    batch_size: int, tokens: int, rejected: int, mels: int, device: str, dtype: torch.dtype, seed: int
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prefix = [SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]
    clips = []
    for index in range(batch_size):
        segments = []
        for length in [tokens, *rejected_lengths(tokens, rejected)]:
            text = torch.randint(0, 50256, (length,), generator=gen).tolist()
            segments.append((prefix + text + [EOT], len(prefix)))
        clips.append(
            {"input_features": torch.randn(mels, 3000, generator=gen).numpy(), "segments": segments, "index": index}
        )
    batch = PreferenceCollator(pad_token_id=EOT)(clips)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["input_features"] = batch["input_features"].to(dtype)
    return batch


@contextlib.contextmanager
def variant_settings(model, variant: str):
    """Freeze the encoder or switch on checkpointing for one variant, and undo it afterwards."""
    encoder_params = list(model.model.encoder.parameters())
    trainable = [p.requires_grad for p in encoder_params]
    if variant.endswith("freeze_encoder"):
        for p in encoder_params:
            p.requires_grad_(False)
    if variant.endswith("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        for p, flag in zip(encoder_params, trainable):
            p.requires_grad_(flag)
        if variant.endswith("checkpointing"):
            model.gradient_checkpointing_disable()


def forward(model, batch: dict, variant: str) -> torch.Tensor:
    if variant.startswith("two-pass"):
        out = two_pass_forward(model, batch, pad_token_id=EOT)
    else:
        out = ORPOWhisper(model, selective_recompute=variant.endswith("selective"))(batch)
    loss, _ = ORPO(out)
    return loss


def heap_in_use(device: str) -> int:
    """Bytes the process holds in use right now: CUDA's allocated bytes, or glibc's heap in use (small
    blocks plus mmap'ed ones; read-only, nothing is tuned). Independent of what the OS reports as RSS."""
    if device == "cuda":
        return torch.cuda.memory_allocated()

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks")
            + ("fordblks", "keepcost")
        ]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def measure_memory(model, batch: dict, variant: str, device: str, profile_memory: bool) -> dict:
    """Activation bytes kept for backward and the loss of one variant (a forward, no backward)."""
    result = {}
    with variant_settings(model, variant):
        saved = SavedBytes([*model.parameters(), *batch.values()])
        with observe_saved_tensors(saved):
            loss = forward(model, batch, variant)
        result["saved_bytes"] = saved.total
        result["loss"] = loss.item()
        del loss
        if device == "cpu" and profile_memory:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                loss = forward(model, batch, variant)
            result["retained_bytes"] = sum(e.self_cpu_memory_usage for e in prof.events())
            del loss, prof
    return result


def time_step(model, batch: dict, variant: str, device: str) -> dict:
    """Seconds of one forward + backward of one variant, and on CUDA its peak memory above the start."""
    result = {}
    with variant_settings(model, variant):
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_memory = torch.cuda.memory_allocated()
        start = time.perf_counter()
        forward(model, batch, variant).backward()
        if device == "cuda":
            torch.cuda.synchronize()
            result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - start_memory
        result["seconds"] = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
    return result


def measure(model, batch: dict, variant: str, device: str, profile_memory: bool = False) -> dict:
    """One whole measurement of one variant: its memory, then one timed step."""
    return measure_memory(model, batch, variant, device, profile_memory) | time_step(model, batch, variant, device)


def check_heap(heap: list[int], saved_bytes: int, what: str) -> None:
    growth = heap[-1] - heap[0]
    if growth > HEAP_GROWTH_LIMIT * saved_bytes:
        raise RuntimeError(
            f"{what}: in-use memory grew by {growth / 2**20:,.0f} MiB over {len(heap)} repeats (one step keeps "
            f"{saved_bytes / 2**20:,.0f} MiB): something keeps the steps' graphs alive, and later figures would "
            "be distorted; find the reference that holds them"
        )


def run_setting(model, size: str, setting: dict, variants: list[str], repeats: int, device: str, dtype) -> dict:
    """Memory once per variant, then ``repeats`` rounds of timed steps, every variant once per round."""
    batch_size, tokens, rejected = setting["batch"], setting["tokens"], setting["rejected"]
    seed = batch_size * 1000 + tokens * 10 + rejected
    batch = build_batch(batch_size, tokens, rejected, SHAPES[size].mels, device, dtype, seed)
    forward(model, batch, "one-pass").backward()  # warm-up
    model.zero_grad(set_to_none=True)
    results = {v: measure_memory(model, batch, v, device, setting["profile_memory"]) for v in variants}
    heap = []
    for _ in range(repeats):
        for variant in variants:
            step = time_step(model, batch, variant, device)
            results[variant].setdefault("seconds_per_repeat", []).append(step["seconds"])
            if "cuda_peak_bytes" in step:
                results[variant]["cuda_peak_bytes"] = max(
                    step["cuda_peak_bytes"], results[variant].get("cuda_peak_bytes", 0)
                )
        gc.collect()
        heap.append(heap_in_use(device))
    check_heap(heap, results["two-pass"]["saved_bytes"], f"{size}, {setting}")
    return results


def summarise(size: str, setting: dict, results: dict, dtype: torch.dtype) -> dict:
    """Per variant: memory and its ratio, the floor, time median and spread, paired time ratios, FLOP ratio."""
    shape = SHAPES[size]
    step = Step.of(setting["batch"], setting["tokens"], rejected_lengths(setting["tokens"], setting["rejected"]))
    reference = results["two-pass"]
    floor = activation_floor_bytes(shape, step, torch.finfo(dtype).bits // 8)
    summary = {}
    for variant, values in results.items():
        seconds = values["seconds_per_repeat"]
        paired = [s / r for s, r in zip(seconds, reference["seconds_per_repeat"])]
        entry = {
            "saved_bytes": values["saved_bytes"],
            "activation_memory": values["saved_bytes"] / reference["saved_bytes"],
            "floor_bytes": floor,
            "floor_memory": floor / reference["saved_bytes"],
            "seconds_median": statistics.median(seconds),
            "seconds_min": min(seconds),
            "seconds_max": max(seconds),
            "step_time": statistics.median(paired),
            "step_time_min": min(paired),
            "step_time_max": max(paired),
            "flops": step_flops(shape, step, variant) / step_flops(shape, step, "two-pass"),
            "loss_rel_diff": abs(values["loss"] - reference["loss"]) / abs(reference["loss"]),
        }
        for key in ("retained_bytes", "cuda_peak_bytes"):
            if key in values:
                entry[key] = values[key]
                entry[key.replace("_bytes", "_memory")] = values[key] / reference[key]
        summary[variant] = entry
    return summary


HEADER = ["model", "batch", "K", "tokens", "variant", "saved MiB", "× two-pass", "floor MiB", "floor × two-pass"]
TIME_HEADER = ["step s: median (min–max)", "time × two-pass: median (min–max)", "FLOPs × two-pass", "loss rel diff"]


def table_header(device: str, profile_memory: bool) -> list[str]:
    extra = ["retained MiB", "× two-pass"] if device == "cpu" and profile_memory else []
    extra = ["CUDA peak MiB", "× two-pass"] if device != "cpu" else extra
    header = HEADER + extra + TIME_HEADER
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def table_rows(size: str, setting: dict, summary: dict) -> list[str]:
    rows = []
    for variant, e in summary.items():
        cells = [size, str(setting["batch"]), str(setting["rejected"]), str(setting["tokens"]), variant]
        cells += [f"{e['saved_bytes'] / 2**20:,.0f}", f"{e['activation_memory']:.3f}"]
        cells += [f"{e['floor_bytes'] / 2**20:,.0f}", f"{e['floor_memory']:.3f}"]
        for key in ("retained", "cuda_peak"):
            if f"{key}_bytes" in e:
                cells += [f"{e[f'{key}_bytes'] / 2**20:,.0f}", f"{e[f'{key}_memory']:.3f}"]
        cells.append(f"{e['seconds_median']:.3f} ({e['seconds_min']:.3f}–{e['seconds_max']:.3f})")
        cells.append(f"{e['step_time']:.3f} ({e['step_time_min']:.3f}–{e['step_time_max']:.3f})")
        cells += [f"{e['flops']:.3f}", f"{e['loss_rel_diff']:.1e}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", nargs="+", default=["small"], choices=list(SHAPES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--rejected", nargs="+", type=int, default=[1], help="rejected transcripts per clip (K)")
    parser.add_argument("--tokens", nargs="+", type=int, default=[40], help="chosen transcript length in tokens")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; every variant runs once per round")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument(
        "--profile-memory",
        action="store_true",
        help="CPU: also count the bytes still allocated after the forward with the torch profiler "
        "(an independent check of the hook count; slow and memory-hungry)",
    )
    parser.add_argument("--write-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args(argv)
    if min(args.tokens) - 3 * max(args.rejected) < 1:
        parser.error(f"--tokens {min(args.tokens)} leaves no text for {max(args.rejected)} rejected transcripts")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["two-pass"] + [v for v in args.variants if v != "two-pass"]
    dtype = getattr(torch, args.dtype)
    rows, all_ratios = table_header(args.device, args.profile_memory), {}
    for size in args.model_size:
        model = build_model(size, args.device, dtype)
        for tokens in args.tokens:
            for rejected in args.rejected:
                for batch_size in args.batch:
                    setting = {"batch": batch_size, "tokens": tokens, "rejected": rejected}
                    setting["profile_memory"] = args.profile_memory
                    results = run_setting(model, size, setting, variants, args.repeats, args.device, dtype)
                    summary = summarise(size, setting, results, dtype)
                    new_rows = table_rows(size, setting, summary)
                    print("\n".join(new_rows), flush=True)
                    rows += new_rows
                    for variant, entry in summary.items():
                        all_ratios[f"{size}/b{batch_size}/k{rejected}/t{tokens}/{variant}"] = entry
        del model
    table = "\n".join(rows)
    print(table)
    if args.write_results:
        write_results(table, args)
    print(json.dumps(all_ratios))
    return all_ratios


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def write_results(table: str, args) -> None:
    path = Path(__file__).resolve().parent / "RESULTS.md"
    command = "python bench/step.py " + " ".join(sys.argv[1:])
    section = (
        f"## {datetime.date.today().isoformat()}: {machine()}, torch {torch.__version__}, {args.dtype}\n\n"
        f"`{command}`\n\n{table}\n"
    )
    previous = path.read_text() if path.exists() else "# Benchmark results\n\n"
    path.write_text(previous.rstrip() + "\n\n" + section)


if __name__ == "__main__":
    main()
