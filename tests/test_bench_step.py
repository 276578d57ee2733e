"""bench/: the step benchmark keeps no memory from one measurement to the next, its analytic floor and FLOP count
agree with independent counts (saved-tensor hooks, torch's FLOP counter), the largest-batch search finds the
boundary, and bench/gpu.py's dry run takes every path of the GPU script on CPU."""

from __future__ import annotations

import gc
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import floor  # noqa: E402
import gpu  # noqa: E402
import step  # noqa: E402

MiB = 2**20


@pytest.mark.parametrize("variant", ["two-pass", "one-pass", "one-pass+selective"])
def test_in_use_memory_is_flat_across_repeated_measurements(variant):
    model = step.build_model("test", "cpu", torch.float32)
    batch = step.build_batch(2, 20, 2, 80, "cpu", torch.float32, seed=random.randrange(10**6))
    heap = []
    for _ in range(6):
        result = step.measure(model, batch, variant, "cpu")
        gc.collect()
        heap.append(step.heap_in_use("cpu"))
    # the first call allocates what every later one reuses; a kept graph would add its saved bytes per call
    growth = heap[-1] - heap[1]
    assert growth < 0.1 * result["saved_bytes"], f"{growth / MiB:.1f} MiB over 5 calls, one step saves {result}"


def test_the_benchmark_stops_when_memory_grows():
    step.check_heap([100 * MiB, 101 * MiB], saved_bytes=40 * MiB, what="flat")
    with pytest.raises(RuntimeError, match="grew by 30 MiB over 3 repeats"):
        step.check_heap([100 * MiB, 115 * MiB, 130 * MiB], saved_bytes=40 * MiB, what="leaking")


@pytest.mark.parametrize(
    "shape,clips,tokens,rejected",
    [
        (floor.Shape(64, 2, 2, 256, 80, 51865), 2, 20, 1),
        (floor.Shape(96, 3, 4, 160, 80, 51865), 1, 50, 3),
    ],
)
def test_the_floor_is_what_the_one_pass_step_keeps(monkeypatch, shape, clips, tokens, rejected):
    monkeypatch.setitem(step.SHAPES, "probe", shape)
    model = step.build_model("probe", "cpu", torch.float32)
    batch = step.build_batch(clips, tokens, rejected, 80, "cpu", torch.float32, seed=random.randrange(10**6))
    kept = step.measure_memory(model, batch, "one-pass", "cpu", profile_memory=False)["saved_bytes"]
    counted = floor.activation_floor_bytes(
        shape, floor.Step.of(clips, tokens, step.rejected_lengths(tokens, rejected)), 4
    )
    # what the floor leaves out (the block mask, indices, the head's per-chunk results) is a few percent
    assert 0.99 * counted <= kept <= 1.06 * counted


@pytest.mark.parametrize("variant", ["one-pass", "two-pass"])
def test_the_forward_flop_count_is_what_torch_counts(variant):
    """Against torch's FLOP counter, with eager attention (its products are counted there, over the whole
    packed row: the kernel computes the masked pairs too, the floor counts each transcript's causal pairs)."""
    shape, clips, tokens, rejected = step.SHAPES["test"], 2, random.randint(12, 30), random.randint(1, 3)
    model = step.build_model("test", "cpu", torch.float32)
    model.config._attn_implementation = "eager"
    batch = step.build_batch(clips, tokens, rejected, 80, "cpu", torch.float32, seed=random.randrange(10**6))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        step.forward(model, batch, variant)

    shape_step = floor.Step.of(clips, tokens, step.rejected_lengths(tokens, rejected))
    lengths = shape_step.transcript_positions
    passes = len(lengths) if variant == "two-pass" else 1
    per_clip = passes * (floor.encoder_flops(shape) + floor.cross_keys_values_flops(shape))
    per_clip += floor.decoder_flops(shape, lengths) + sum(lengths) * 2 * shape.d_model * shape.vocab
    causal = sum(n * (n + 1) // 2 for n in lengths)
    computed = sum(lengths) ** 2 if variant == "one-pass" else sum(n * n for n in lengths)
    per_clip += shape.layers * 4 * shape.d_model * (computed - causal)
    assert counter.get_total_flops() == clips * per_clip


def test_step_flops_are_three_forwards_and_the_one_pass_step_costs_less():
    shape = step.SHAPES["small"]
    one = floor.Step.of(1, 40, [37])
    forward = floor.encoder_flops(shape) + floor.cross_keys_values_flops(shape) + floor.decoder_flops(shape, (44, 41))
    head = 85 * 2 * shape.d_model * shape.vocab
    assert floor.step_flops(shape, one, "one-pass") == 3 * forward + 4 * head
    assert floor.step_flops(shape, one, "one-pass+freeze_encoder") == floor.step_flops(
        shape, one, "one-pass"
    ) - 2 * floor.encoder_flops(shape)
    ratios = [
        floor.step_flops(shape, floor.Step.of(1, 40, step.rejected_lengths(40, k)), "one-pass")
        / floor.step_flops(shape, floor.Step.of(1, 40, step.rejected_lengths(40, k)), "two-pass")
        for k in (1, 2, 4)
    ]
    assert 0.45 < ratios[0] < 0.6 and ratios[0] > ratios[1] > ratios[2]


@pytest.mark.parametrize("boundary,cap", [(37, 512), (1, 8), (0, 8), (20, 20), (64, 100), (500, 100)])
def test_the_largest_batch_search_finds_the_boundary_in_few_probes(boundary, cap):
    probes = []

    def fits(batch_size):
        probes.append(batch_size)
        return batch_size <= boundary

    found = gpu.largest_batch(fits, cap)
    assert found["batch"] == min(boundary, cap)
    assert ("cap" in found["note"]) == (boundary >= cap)
    assert len(probes) <= 2 * cap.bit_length() + 1 and len(set(probes)) == len(probes)


def test_the_largest_batch_search_stops_for_time_and_says_so():
    found = gpu.largest_batch(lambda batch_size: True, 512, deadline=0.0)
    assert found == {"batch": 0, "note": "stopped for time: fits 0, 1 not tried"}


def test_the_attention_calls_are_told_apart_by_their_lengths():
    assert gpu.attention_kind([2, 6, 1500, 64], [2, 6, 1500, 64]) == "encoder self-attention"
    assert gpu.attention_kind([2, 6, 85, 64], [2, 6, 1500, 64]) == "decoder cross-attention"
    assert gpu.attention_kind([2, 6, 85, 64], [2, 6, 85, 64]).startswith("decoder self-attention")


@pytest.mark.slow
def test_the_gpu_script_dry_run_takes_every_path_on_cpu(tmp_path):
    results = tmp_path / "RESULTS.md"
    command = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--output", str(tmp_path / "gpu.json")]
    done = subprocess.run([*command, "--results", str(results)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["dry_run"] and report["bf16_matmul_tflops"] > 0
    figures = report["sizes"]["test"]
    losses = [m["loss"] for m in figures["memory"].values()]
    assert list(figures["memory"]) == gpu.MEMORY_VARIANTS
    assert max(losses) - min(losses) < 0.02 * abs(losses[0])  # one model for all variants (bf16 autocast)
    assert set(figures["sdpa_kernels"]) == {
        "encoder self-attention",
        "decoder cross-attention",
        "decoder self-attention (block-causal mask)",
    }
    assert all(figures["throughput"][v]["samples_per_s"] > 0 for v in gpu.SEARCH_VARIANTS)
    assert figures["features"]["host features"] > 0 and figures["features"]["on-device features"] > 0
    assert all(figures["largest_batch"][v]["batch"] == 4 for v in gpu.SEARCH_VARIANTS)
    for check in [*report["quantized_lora"].values(), report["zero2"]]:
        assert torch.isfinite(torch.tensor(check["loss"])) and check["seconds"] > 0
    assert report["quantized_lora"]["8-bit"]["trainable_parameters"] > 0
    assert report["zero2"]["zero_stage"] == 2
    section = results.read_text()
    assert "CPU (dry run)" in section and "| test | decoder self-attention (block-causal mask) |" in section
    assert "| ZeRO-2 | test |" in section and "| LoRA, 4-bit | test |" in section
    assert "samples/s, on-device log-mel" in section
