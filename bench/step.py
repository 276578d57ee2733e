"""ORPO step benchmark: our one-pass step against the two-pass reference, side by side in one run.

    python bench/step.py --model-size small --batch 1 2 4
    python bench/step.py --model-size small --batch 4 --tokens 120
    python bench/step.py --model-size small large-v3 --batch 1 4 --device cuda --dtype bfloat16

Randomly initialised Whisper models of the real shapes, 30 s clips (3000 mel frames), a chosen
transcript of ``--tokens`` tokens and a rejected one 3 tokens shorter, after the 4-token prefix. For
each setting every variant runs on identical inputs, in alternating order, ``--repeats`` times; the
median is reported. Measured per variant:

* activation memory: bytes kept for backward (parameters and inputs excluded), through saved-tensor
  hooks (``orpo.recompute.observe_saved_tensors``); with ``--profile-memory`` on CPU also the bytes
  still allocated after the forward (torch profiler, an independent count); on CUDA
  ``torch.cuda.max_memory_allocated`` over the step;
* step time: forward + backward;
* the loss, which must equal the reference's.

Prints a table and, last, one line of JSON with the ratios (ours / two-pass) per setting;
``--write-results`` also writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orpo.data.collate import PreferenceCollator  # noqa: E402
from orpo.loss import orpo_loss  # noqa: E402
from orpo.model.orpo_whisper import ORPOWhisper
from orpo.model.recompute import SavedBytes, observe_saved_tensors  # noqa: E402
from orpo.model.reference import two_pass_forward  # noqa: E402

SHAPES = {  # d_model, layers, heads, ffn, mel bins, vocabulary
    "tiny": (384, 4, 6, 1536, 80, 51865),
    "base": (512, 6, 8, 2048, 80, 51865),
    "small": (768, 12, 12, 3072, 80, 51865),
    "medium": (1024, 24, 16, 4096, 80, 51865),
    "large-v3": (1280, 32, 20, 5120, 128, 51866),
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


def build_model(size: str, device: str, dtype: torch.dtype) -> WhisperForConditionalGeneration:
    d_model, layers, heads, ffn, mels, vocab = SHAPES[size]
    config = WhisperConfig(
        vocab_size=vocab,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        num_mel_bins=mels,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(config).to(device=device, dtype=dtype).train()


def build_batch(batch_size: int, tokens: int, mels: int, device: str, dtype: torch.dtype, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prefix = [SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]
    clips = []
    for index in range(batch_size):
        segments = []
        for length in (tokens, tokens - 3):
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
    loss, _ = orpo_loss(out["logps_chosen"], out["logps_rejected"], out["rejected_mask"], out["nll_chosen"], 0.1)
    return loss


def measure(model, batch: dict, variant: str, device: str, profile_memory: bool) -> dict:
    """Activation memory, step time and loss of one variant, one repeat."""
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
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_memory = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = forward(model, batch, variant)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
            result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - start_memory
        result["seconds"] = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
    return result


def run_setting(
    model,
    size: str,
    batch_size: int,
    tokens: int,
    variants: list[str],
    repeats: int,
    device: str,
    dtype: torch.dtype,
    profile_memory: bool,
) -> dict:
    mels = SHAPES[size][4]
    batch = build_batch(batch_size, tokens, mels, device, dtype, seed=batch_size * 1000 + tokens)
    forward(model, batch, "one-pass").backward()  # warm-up
    model.zero_grad(set_to_none=True)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(repeats):
        order = variants if repeat % 2 == 0 else list(reversed(variants))
        for variant in order:
            runs[variant].append(measure(model, batch, variant, device, profile_memory))
    summary = {}
    for variant, results in runs.items():
        summary[variant] = {key: statistics.median(r[key] for r in results) for key in results[0]}
    return summary


def ratio_table(size: str, batch_size: int, tokens: int, summary: dict) -> tuple[list[str], dict]:
    reference = summary["two-pass"]
    rows, ratios = [], {}
    for variant, values in summary.items():
        memory = values["saved_bytes"] / reference["saved_bytes"]
        seconds = values["seconds"] / reference["seconds"]
        loss_gap = abs(values["loss"] - reference["loss"]) / abs(reference["loss"])
        entry = {"activation_memory": round(memory, 4), "step_time": round(seconds, 4), "loss_rel_diff": loss_gap}
        cells = [size, str(batch_size), str(tokens), variant, f"{values['saved_bytes'] / 2**20:,.0f}", f"{memory:.3f}"]
        if "retained_bytes" in values:
            retained = values["retained_bytes"] / reference["retained_bytes"]
            entry["retained_memory"] = round(retained, 4)
            cells += [f"{values['retained_bytes'] / 2**20:,.0f}", f"{retained:.3f}"]
        if "cuda_peak_bytes" in values:
            peak = values["cuda_peak_bytes"] / reference["cuda_peak_bytes"]
            entry["cuda_peak_memory"] = round(peak, 4)
            cells += [f"{values['cuda_peak_bytes'] / 2**20:,.0f}", f"{peak:.3f}"]
        cells += [f"{values['seconds']:.3f}", f"{seconds:.3f}", f"{loss_gap:.1e}"]
        rows.append("| " + " | ".join(cells) + " |")
        if variant != "two-pass":
            ratios[f"{size}/b{batch_size}/t{tokens}/{variant}"] = entry
    return rows, ratios


def return_freed_memory_to_the_system() -> None:
    """glibc keeps freed activation-sized blocks in its heap, so the process grows run after run (seen: 13 GB
    for whisper-small at batch 1). Serving large blocks with mmap returns them at once."""
    if platform.system() == "Linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD


def main() -> None:
    return_freed_memory_to_the_system()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", nargs="+", default=["small"], choices=sorted(SHAPES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--tokens", nargs="+", type=int, default=[40], help="chosen transcript length in tokens")
    parser.add_argument("--repeats", type=int, default=3)
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
    parser.add_argument("--write-results", action="store_true", help="write bench/RESULTS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["two-pass"] + [v for v in args.variants if v != "two-pass"]
    dtype = getattr(torch, args.dtype)

    header = ["model", "batch", "tokens", "variant", "saved MiB", "× two-pass"]
    if args.device == "cpu" and args.profile_memory:
        header += ["retained MiB", "× two-pass"]
    elif args.device != "cpu":
        header += ["CUDA peak MiB", "× two-pass"]
    header += ["step s", "× two-pass", "loss rel diff"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    all_ratios = {}
    for size in args.model_size:
        model = build_model(size, args.device, dtype)
        for tokens in args.tokens:
            for batch_size in args.batch:
                summary = run_setting(
                    model, size, batch_size, tokens, variants, args.repeats, args.device, dtype, args.profile_memory
                )
                new_rows, ratios = ratio_table(size, batch_size, tokens, summary)
                rows += new_rows
                all_ratios.update(ratios)
                print("\n".join(new_rows), flush=True)
        del model
    table = "\n".join(rows)
    print(table)
    if args.write_results:
        write_results(table, args)
    print(json.dumps(all_ratios))


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
