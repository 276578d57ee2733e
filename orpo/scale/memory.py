"""Model-state memory per GPU of each launch configuration (``whisper-orpo memory``; the README's Scaling table)."""

from __future__ import annotations

from orpo.config import MemoryConfig
from orpo.errors import ConfigError

# Parameter counts of the released checkpoints (OpenAI's model card).
MODEL_PARAMETERS = {
    "tiny": 39e6,
    "base": 74e6,
    "small": 244e6,
    "medium": 769e6,
    "large-v3": 1550e6,
    "large-v3-turbo": 809e6,
}
GIB = 1024**3

# Bytes per parameter of the model states in mixed-precision training with Adam (ZeRO paper, section 3):
# 16-bit parameters, 16-bit gradients, and fp32 master weights + Adam's two moments.
PARAM_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12

LAUNCHES = ("ddp", "zero2", "zero3", "zero3_offload")


def model_state_bytes(parameters: float, gpus: int, launch: str) -> dict[str, float]:
    """Model-state bytes per GPU and per process in CPU memory, for a full fine-tune with AdamW.

    * ddp: every GPU holds everything (16 B/param; the trainer keeps fp32 weights and autocasts, which
      is the same 4 + 4 + 8 bytes).
    * zero2: 16-bit parameters replicated; gradients and optimizer states sharded over the GPUs.
    * zero3: parameters, gradients and optimizer states all sharded.
    * zero3_offload: parameters and optimizer states live in CPU memory (sharded over processes); the
      GPU keeps only the layers being computed (activations and the live-parameter buffer come on top).
    Activations, the CUDA context and allocator slack come on top of every figure.
    """
    n, g = float(parameters), int(gpus)
    if launch == "ddp":
        return {"gpu": n * (PARAM_BYTES + GRAD_BYTES + OPTIMIZER_BYTES), "cpu": 0.0}
    if launch == "zero2":
        return {"gpu": n * PARAM_BYTES + n * (GRAD_BYTES + OPTIMIZER_BYTES) / g, "cpu": 0.0}
    if launch == "zero3":
        return {"gpu": n * (PARAM_BYTES + GRAD_BYTES + OPTIMIZER_BYTES) / g, "cpu": 0.0}
    if launch == "zero3_offload":
        return {"gpu": 0.0, "cpu": n * (PARAM_BYTES + GRAD_BYTES + OPTIMIZER_BYTES) / g}
    raise ValueError(f"unknown launch {launch!r}; one of {', '.join(LAUNCHES)}")


def memory_table(models: list[str], gpus: int) -> str:
    """A Markdown table: model-state GiB per GPU for each launch configuration, with ``gpus`` GPUs."""
    header = ["model", "parameters", "DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3 offload (GPU / CPU per process)"]
    rows = []
    for name in models:
        n = MODEL_PARAMETERS[name] if name in MODEL_PARAMETERS else float(name)
        cells = [name, f"{n / 1e6:,.0f}M"]
        for launch in LAUNCHES:
            b = model_state_bytes(n, gpus, launch)
            cells.append(
                f"{b['gpu'] / GIB:.2f} GiB"
                if launch != "zero3_offload"
                else f"layers in use / {b['cpu'] / GIB:.2f} GiB"
            )
        rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_memory_table(cfg: MemoryConfig) -> None:
    for name in cfg.memory:
        if name not in MODEL_PARAMETERS:
            try:
                float(name)
            except ValueError:
                raise ConfigError(
                    f"memory: unknown model {name!r}; one of {', '.join(MODEL_PARAMETERS)} or a parameter count",
                    key="memory",
                ) from None
    models = cfg.memory or list(MODEL_PARAMETERS)
    print(
        f"Model states per GPU with {cfg.gpus} GPU{'s' if cfg.gpus > 1 else ''} (full fine-tune, AdamW; "
        "activations not included):\n"
    )
    print(memory_table(models, cfg.gpus))
