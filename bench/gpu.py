"""The GPU benchmark: one prepared run on one CUDA GPU, under 8 minutes, for whisper-small and large-v3 shapes.

    python bench/gpu.py                      # on a CUDA machine: bench/gpu.json and a bench/RESULTS.md section
    python bench/gpu.py --dry-run            # the same code paths on CPU with a tiny model, in a minute or two

Randomly initialised models of the real shapes (no hub needed), float32 weights under bf16 autocast, as
``mixed_precision: bf16`` trains them; 30 s clips, a 40-token chosen transcript and one rejected one. Measured:

1. the GPU's bf16 matrix-product peak (a large matmul, timed in this run);
2. peak CUDA memory of a full step (forward, backward, AdamW) at a fixed batch: two-pass, one-pass,
   one-pass + selective recompute, one-pass + frozen encoder;
3. the largest batch each way fits (doubling, then bisection, capped by ``--max-batch``);
4. samples/s of a full step, and that as a fraction of the FLOP floor (``bench/floor.py``) at the measured
   peak;
5. samples/s of the one-pass step fed host log-mel features against raw waveforms featurised on the device
   (``features_on_device``);
6. which SDPA kernel serves each attention (encoder, decoder self-attention under the block-causal mask,
   cross-attention), read from the profiler's op names;
7. one LoRA step with ``load_in_8bit`` and with ``load_in_4bit`` through the trainer's own loading code;
8. one DeepSpeed ZeRO-2 step through the trainer's accelerator set-up, in a child process.

``--dry-run`` runs every one of these on CPU with the ``test`` shape (bitsandbytes' CPU backend, DeepSpeed's
CPU accelerator over gloo); CUDA-only figures (peak memory) are then absent, and nothing is written to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from floor import Step, step_flops  # noqa: E402
from step import ORPO, SHAPES, build_batch, build_model, forward, rejected_lengths, variant_settings  # noqa: E402

from orpo.config import TrainConfig  # noqa: E402
from orpo.model.load import load_whisper  # noqa: E402
from orpo.model.log_mel import LogMel  # noqa: E402
from orpo.model.orpo_whisper import ORPOWhisper  # noqa: E402
from orpo.model.peft import apply_peft  # noqa: E402
from orpo.train.loop import make_optimizer  # noqa: E402

TOKENS, REJECTED = 40, 1
MEMORY_VARIANTS = ["two-pass", "one-pass", "one-pass+selective", "one-pass+freeze_encoder"]
SEARCH_VARIANTS = ["two-pass", "one-pass"]
PLAN = {  # size: fixed batch, largest batch searched
    "gpu": {"small": (16, 512), "large-v3": (4, 128)},
    "dry-run": {"test": (2, 4)},
}


class Bench:
    """Device, precision and timing of this run; every measurement goes through it."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.cuda = self.device == "cuda"

    def autocast(self):
        return torch.autocast(self.device, dtype=torch.bfloat16)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def peak_memory(self, into: dict):
        """``into["peak_bytes"]``: the most CUDA memory allocated inside the block (None on CPU)."""
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        yield
        self.synchronize()
        into["peak_bytes"] = torch.cuda.max_memory_allocated() if self.cuda else None

    def timed(self, work, repeats: int) -> list[float]:
        """Seconds of ``repeats`` calls of ``work`` after one warm-up call."""
        work()
        seconds = []
        for _ in range(repeats):
            self.synchronize()
            start = time.perf_counter()
            work()
            self.synchronize()
            seconds.append(time.perf_counter() - start)
        return seconds


def bf16_matmul_peak(bench: Bench) -> float:
    """FLOP/s of a large bf16 matrix product on this device, measured now (the floor's denominator)."""
    n = 256 if bench.dry_run else 8192
    a = torch.randn(n, n, device=bench.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=bench.device, dtype=torch.bfloat16)
    seconds = bench.timed(lambda: torch.mm(a, b), repeats=5 if bench.dry_run else 50)
    return 2 * n**3 / statistics.median(seconds)


def full_step(model, optimizer, batch: dict, variant: str, bench: Bench) -> float:
    """One optimizer step as training takes it: bf16 autocast forward, backward, AdamW; returns the loss."""
    with bench.autocast():
        loss = forward(model, batch, variant)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def optimizer_for(model) -> torch.optim.AdamW:
    """The trainer's AdamW at learning rate 0: all of its work and state, but the weights stay as they are, so
    every variant and batch size measures the same model and the variants' losses must agree."""
    return make_optimizer(model, TrainConfig(learning_rate=0.0))


def step_memory(model, size: str, batch_size: int, variant: str, bench: Bench) -> dict:
    """Peak memory and loss of full steps of one variant at one batch size (two steps: AdamW's state exists
    from the first, so the second shows the steady state)."""
    batch = build_batch(batch_size, TOKENS, REJECTED, SHAPES[size].mels, bench.device, torch.float32, seed=batch_size)
    result = {}
    with variant_settings(model, variant):
        optimizer = optimizer_for(model)
        full_step(model, optimizer, batch, variant, bench)
        with bench.peak_memory(result):
            result["loss"] = full_step(model, optimizer, batch, variant, bench)
    del optimizer
    return result


def fits(model, size: str, variant: str, bench: Bench, batch_size: int) -> bool:
    """Whether full steps of ``variant`` at ``batch_size`` fit in GPU memory."""
    try:
        step_memory(model, size, batch_size, variant, bench)
        fitted = True
    except torch.cuda.OutOfMemoryError:
        fitted = False
    model.zero_grad(set_to_none=True)  # outside the handler: its traceback no longer holds the step's tensors
    gc.collect()
    if bench.cuda:
        torch.cuda.empty_cache()
    return fitted


def largest_batch(fits_batch, cap: int, deadline: float = float("inf")) -> dict:
    """The largest batch size in [1, cap] for which ``fits_batch`` holds (0 if none): doubling, then bisection
    between the last size that fitted and the first that did not. Once ``deadline`` (time.monotonic) has
    passed no further size is tried, and the note says between which sizes the answer lies."""
    low, high = 0, cap + 1  # low fits (0 trivially), high does not
    probe = 1
    while probe < high:
        if time.monotonic() > deadline:
            return {"batch": low, "note": f"stopped for time: fits {low}, {probe} not tried"}
        if not fits_batch(probe):
            high = probe
            break
        low = probe
        probe = min(2 * probe, cap) if probe < cap else high
    while high - low > 1:
        if time.monotonic() > deadline:
            return {"batch": low, "note": f"stopped for time: fits {low}, not {high}"}
        middle = (low + high) // 2
        if fits_batch(middle):
            low = middle
        else:
            high = middle
    return {"batch": low, "note": f"the search's cap ({cap})" if low == cap else ""}


def throughput(model, size: str, batch_size: int, variant: str, peak_flops: float, bench: Bench) -> dict:
    """Samples/s of full steps, and the share of the bf16 peak that the step's FLOP count (bench/floor.py)
    would need at that rate: how close the step comes to its arithmetic floor."""
    batch = build_batch(batch_size, TOKENS, REJECTED, SHAPES[size].mels, bench.device, torch.float32, seed=1)
    with variant_settings(model, variant):
        optimizer = optimizer_for(model)
        seconds = bench.timed(
            lambda: full_step(model, optimizer, batch, variant, bench), repeats=2 if bench.dry_run else 5
        )
    step = Step.of(batch_size, TOKENS, rejected_lengths(TOKENS, REJECTED))
    median = statistics.median(seconds)
    return {
        "batch": batch_size,
        "seconds_median": median,
        "seconds_min": min(seconds),
        "seconds_max": max(seconds),
        "samples_per_s": batch_size / median,
        "floor_fraction": step_flops(SHAPES[size], step, variant) / median / peak_flops,
    }


SDPA_KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_attention_math": "math",
}


def attention_kind(query_shape: list[int], key_shape: list[int]) -> str:
    """Which of Whisper's attentions a call is, from its query and key lengths (the encoder has 1500 positions)."""
    query_length, key_length = query_shape[-2], key_shape[-2]
    if key_length == 1500:
        return "encoder self-attention" if query_length == 1500 else "decoder cross-attention"
    return "decoder self-attention (block-causal mask)"


def sdpa_kernels(model, size: str, bench: Bench) -> dict:
    """The SDPA kernel each attention of the one-pass forward ran, as the profiler names it."""
    batch = build_batch(2, TOKENS, REJECTED, SHAPES[size].mels, bench.device, torch.float32, seed=2)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof, bench.autocast():
        forward(model, batch, "one-pass")
    kernels: dict[str, set[str]] = {}
    for event in prof.events():
        if event.name.startswith("aten::_scaled_dot_product") and len(event.input_shapes) >= 2:
            kind = attention_kind(event.input_shapes[0], event.input_shapes[1])
            kernels.setdefault(kind, set()).add(SDPA_KERNELS.get(event.name, event.name))
    if not kernels:
        raise RuntimeError("the profiler recorded no scaled-dot-product-attention kernel in the one-pass forward")
    return {kind: ", ".join(sorted(names)) for kind, names in sorted(kernels.items())}


def quantized_lora_step(size: str, bits: int, bench: Bench) -> dict:
    """One LoRA step on a model loaded in 8 or 4 bits by the trainer's own loader (bitsandbytes), from a
    safetensors folder written here."""
    with tempfile.TemporaryDirectory() as folder:
        build_model(size, "cpu", torch.float32).save_pretrained(folder, safe_serialization=True)
        cfg = TrainConfig(
            base_model=folder, peft="lora", mixed_precision="bf16", **{f"load_in_{bits}bit": True}, lora_r=8
        )
        whisper = apply_peft(load_whisper(cfg, 0 if bench.cuda else "cpu"), cfg, total_steps=1)
    model = ORPOWhisper(whisper).train()
    batch = build_batch(2, TOKENS, REJECTED, SHAPES[size].mels, bench.device, torch.float32, seed=3)
    optimizer = make_optimizer(model, cfg)
    result = {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    with bench.peak_memory(result):
        start = time.perf_counter()
        with bench.autocast():
            out = model(batch)
            loss, _ = ORPO(out)
        loss.backward()
        optimizer.step()
        bench.synchronize()
        result["seconds"] = time.perf_counter() - start
    result["loss"] = loss.item()
    if not torch.isfinite(loss):
        raise RuntimeError(f"the {bits}-bit LoRA step gave a non-finite loss ({loss.item()})")
    return result


def zero2_step(size: str, bench: Bench) -> dict:
    """One DeepSpeed ZeRO-2 step on one device, in a child process with the environment ``accelerate
    launch`` gives a DeepSpeed run (DeepSpeed owns its process group, so it cannot share this process)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(BENCH.parent / "ds_configs" / "zero2.json"),
        "ACCELERATE_MIXED_PRECISION": "bf16" if bench.cuda else "no",
        "WORLD_SIZE": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    command = [sys.executable, __file__, "--zero2-worker", size] + (["--dry-run"] if bench.dry_run else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the ZeRO-2 step failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def zero2_worker(size: str, bench: Bench) -> None:
    """The child of :func:`zero2_step`: the trainer's accelerator and DeepSpeed config filling, one step."""
    from orpo.scale.launch import build_accelerator, zero_stage
    from orpo.scale.zero3 import fill_deepspeed_config

    accelerator = build_accelerator(mixed_precision=os.environ["ACCELERATE_MIXED_PRECISION"])
    if accelerator.num_processes != 1 or zero_stage(accelerator) != 2:
        raise RuntimeError(
            f"expected one ZeRO-2 process, got {accelerator.num_processes}, stage {zero_stage(accelerator)}"
        )
    whisper = build_model(size, "cpu", torch.float32)
    model = ORPOWhisper(whisper)
    cfg = TrainConfig(per_device_train_batch_size=2, mixed_precision="bf16" if bench.cuda else "no")
    optimizer = make_optimizer(model, cfg)
    fill_deepspeed_config(accelerator, cfg, whisper.config)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = build_batch(2, TOKENS, REJECTED, SHAPES[size].mels, str(accelerator.device), torch.float32, seed=4)
    result = {"zero_stage": zero_stage(accelerator)}
    with bench.peak_memory(result):
        start = time.perf_counter()
        out = model(batch)
        loss, _ = ORPO(out)
        accelerator.backward(loss)
        optimizer.step()
        bench.synchronize()
        result["seconds"] = time.perf_counter() - start
    result["loss"] = loss.item()
    print(json.dumps(result))


def features_throughput(model, size: str, batch_size: int, bench: Bench) -> dict:
    """Samples/s of full one-pass steps fed log-mel features (as the data loader computes them with
    ``features_on_device: false``) and fed raw 30 s waveforms whose log-mel the step computes on the device
    (``features_on_device: true``, :class:`orpo.model.log_mel.LogMel`). The loader's side of each is
    ``bench/data.py``'s per-worker rate."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=SHAPES[size].mels)
    batch = build_batch(batch_size, TOKENS, REJECTED, SHAPES[size].mels, bench.device, torch.float32, seed=5)
    audio = 0.1 * torch.randn(batch_size, extractor.n_samples, generator=torch.Generator().manual_seed(5))
    waveforms = {k: v for k, v in batch.items() if k != "input_features"} | {"input_audio": audio.to(bench.device)}
    one_pass = ORPOWhisper(model, log_mel=LogMel(extractor).to(bench.device))
    optimizer = optimizer_for(model)
    result = {"batch": batch_size}
    for name, inputs in (("host features", batch), ("on-device features", waveforms)):

        def work(inputs=inputs):
            with bench.autocast():
                out = one_pass(inputs)
                loss, _ = ORPO(out)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = bench.timed(work, repeats=2 if bench.dry_run else 5)
        result[name] = batch_size / statistics.median(seconds)
    return result


def measure_fixed_batch(size: str, fixed_batch: int, peak_flops: float, bench: Bench) -> dict:
    """Peak memory of every variant, SDPA kernels and throughput of one model size at its fixed batch."""
    model = build_model(size, bench.device, torch.float32)
    result = {"fixed_batch": fixed_batch, "memory": {}, "throughput": {}}
    for variant in MEMORY_VARIANTS:
        result["memory"][variant] = step_memory(model, size, fixed_batch, variant, bench)
        progress(f"{size}: {variant} at batch {fixed_batch}: {result['memory'][variant]}")
    result["sdpa_kernels"] = sdpa_kernels(model, size, bench)
    progress(f"{size}: SDPA kernels {result['sdpa_kernels']}")
    for variant in SEARCH_VARIANTS:
        result["throughput"][variant] = throughput(model, size, fixed_batch, variant, peak_flops, bench)
        progress(f"{size}: {variant} throughput {result['throughput'][variant]}")
    result["features"] = features_throughput(model, size, fixed_batch, bench)
    progress(f"{size}: samples/s with host and on-device log-mel features {result['features']}")
    return result


def measure_largest_batches(size: str, cap: int, bench: Bench, deadline: float) -> dict:
    model = build_model(size, bench.device, torch.float32)
    found = {}
    for variant in SEARCH_VARIANTS:
        found[variant] = largest_batch(functools.partial(fits, model, size, variant, bench), cap, deadline)
        progress(f"{size}: {variant} largest batch {found[variant]}")
    return found


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def environment(bench: Bench) -> dict:
    name = torch.cuda.get_device_name() if bench.cuda else "CPU (dry run)"
    return {
        "date": datetime.date.today().isoformat(),
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dry_run": bench.dry_run,
        "command": "python bench/gpu.py " + " ".join(sys.argv[1:]),
    }


def run(bench: Bench, time_budget: float) -> dict:
    deadline = time.monotonic() + time_budget
    report = environment(bench)
    peak = bf16_matmul_peak(bench)
    report["bf16_matmul_tflops"] = peak / 1e12
    progress(f"bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s")
    plan = PLAN["dry-run" if bench.dry_run else "gpu"]
    first = next(iter(plan))
    report["quantized_lora"] = {}
    for bits in (8, 4):
        report["quantized_lora"][f"{bits}-bit"] = quantized_lora_step(first, bits, bench) | {"model": first}
        progress(f"{bits}-bit LoRA step: {report['quantized_lora'][f'{bits}-bit']}")
    report["zero2"] = zero2_step(first, bench) | {"model": first}
    progress(f"ZeRO-2 step: {report['zero2']}")
    # the bounded searches last: whatever time is left goes to them
    report["sizes"] = {size: measure_fixed_batch(size, fixed, peak, bench) for size, (fixed, _) in plan.items()}
    for size, (_, cap) in plan.items():
        report["sizes"][size]["largest_batch"] = measure_largest_batches(size, cap, bench, deadline)
    report["seconds"] = time_budget - (deadline - time.monotonic())
    return report


def mib(value) -> str:
    return "—" if value is None else f"{value / 2**20:,.0f}"


def results_section(report: dict) -> str:
    """The bench/RESULTS.md section of one run: the command, then one table per question."""
    lines = [
        f"## {report['date']}: {report['device']}, torch {report['torch']}, CUDA {report['cuda']}, bf16 autocast",
        "",
        f"`{report['command']}` ({report['seconds']:.0f} s; bf16 matmul peak measured in the run: "
        f"{report['bf16_matmul_tflops']:.3g} TFLOP/s; {TOKENS}-token chosen, {REJECTED} rejected, random weights)",
        "",
        "| model | batch | variant | peak MiB | × two-pass | loss | loss rel diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, figures in report["sizes"].items():
        reference = figures["memory"]["two-pass"]
        for variant, m in figures["memory"].items():
            ratio = "—" if reference["peak_bytes"] is None else f"{m['peak_bytes'] / reference['peak_bytes']:.3f}"
            gap = abs(m["loss"] - reference["loss"]) / abs(reference["loss"])
            cells = [size, str(figures["fixed_batch"]), variant, mib(m["peak_bytes"]), ratio, f"{m['loss']:.4f}"]
            cells.append(f"{gap:.1e}")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| model | variant | batch | step s: median (min–max) | samples/s | of FLOP floor | largest batch |"]
    lines.append("|---|---|---|---|---|---|---|")
    for size, figures in report["sizes"].items():
        for variant, t in figures["throughput"].items():
            largest = figures["largest_batch"][variant]
            found = f"{largest['batch']} {largest['note']}".strip()
            lines.append(
                f"| {size} | {variant} | {t['batch']} | {t['seconds_median']:.3f} ({t['seconds_min']:.3f}–"
                f"{t['seconds_max']:.3f}) | {t['samples_per_s']:.2f} | {t['floor_fraction']:.1%} | {found} |"
            )
    lines += [
        "",
        "| model | batch | samples/s, host log-mel features | samples/s, on-device log-mel |",
        "|---|---|---|---|",
    ]
    for size, figures in report["sizes"].items():
        f = figures["features"]
        lines.append(f"| {size} | {f['batch']} | {f['host features']:.2f} | {f['on-device features']:.2f} |")
    lines += ["", "| model | attention | SDPA kernel (profiler) |", "|---|---|---|"]
    for size, figures in report["sizes"].items():
        lines += [f"| {size} | {kind} | {kernel} |" for kind, kernel in figures["sdpa_kernels"].items()]
    lines += ["", "| check | model | loss | s | peak MiB |", "|---|---|---|---|---|"]
    for name, check in [*(("LoRA, " + k, v) for k, v in report["quantized_lora"].items()), ("ZeRO-2", report["zero2"])]:
        lines.append(
            f"| {name} | {check['model']} | {check['loss']:.4f} | {check['seconds']:.2f} | {mib(check['peak_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every code path on CPU with a tiny model")
    parser.add_argument("--output", type=Path, default=BENCH / "gpu.json", help="where the JSON report goes")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="the Markdown file the section is appended to (default: bench/RESULTS.md on a GPU, none on a dry run)",
    )
    parser.add_argument("--time-budget", type=float, default=390, help="seconds after which batch searches stop")
    parser.add_argument("--zero2-worker", metavar="SIZE", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bench = Bench(args.dry_run)
    if args.zero2_worker:
        zero2_worker(args.zero2_worker, bench)
        return
    if not bench.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU; on a machine without one, --dry-run checks the script on CPU")
    report = run(bench, args.time_budget)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_suffix(".tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(args.output)
    results = args.results if args.results is not None else (None if bench.dry_run else BENCH / "RESULTS.md")
    section = results_section(report)
    print(section)
    if results is not None:
        previous = results.read_text() if results.exists() else "# Benchmark results\n"
        results.write_text(previous.rstrip() + "\n\n" + section)


if __name__ == "__main__":
    main()
