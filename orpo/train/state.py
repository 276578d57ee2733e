"""Where a run is: its position in training, its non-finite counters, its metric window, and the settings
that position depends on. A checkpoint keeps exactly this (``trainer_state.json``), and a resumed run
starts from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from orpo.errors import CheckpointError

# The settings that give ``step_in_epoch`` and the random streams their meaning: a run resumed with other
# values would silently see other batches, so a mismatch is an error. ``base_model`` is recorded beside
# them (export reads it) but may change (a moved model directory).
POSITION_SETTINGS = (
    "world_size",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "train_clips",
    "seed",
    "peft",
    "group_by_length",
    "stream_shuffle_buffer",  # with streaming: the blocks a reader orders, and how many readers a process has
    "stream_readers",
)


class MetricWindow:
    """Sums of per-clip metrics since the last report, averaged over clips of all processes."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, per_clip: dict[str, torch.Tensor]) -> None:
        for name, values in per_clip.items():
            self.sums[name] = self.sums.get(name, 0) + values.double().sum()
        self.count += next(iter(per_clip.values())).numel()

    def _reduced_totals(self, accelerator) -> tuple[list[str], torch.Tensor]:
        """(names, sums over all processes with the clip count last); every process must call it."""
        names = sorted(self.sums)
        device = accelerator.device
        count = torch.tensor(float(self.count), device=device, dtype=torch.float64)
        totals = torch.stack([self.sums[n].to(device) for n in names] + [count])
        return names, accelerator.reduce(totals, reduction="sum")

    def mean(self, accelerator) -> dict[str, float]:
        names, totals = self._reduced_totals(accelerator)
        self.sums, self.count = {}, 0
        if totals[-1] == 0:  # every step since the last report was skipped (non-finite loss)
            return {}
        return {name: (totals[i] / totals[-1]).item() for i, name in enumerate(names)}

    def global_state(self, accelerator) -> dict:
        """Sums over all processes, for a checkpoint (every process must call this)."""
        names, totals = self._reduced_totals(accelerator)
        totals = totals.tolist()
        return {"count": int(totals[-1]), "sums": dict(zip(names, totals[:-1]))}

    def load_global_state(self, state: dict, accelerator) -> None:
        """The main process takes the sums, the others zeros under the same names (their sum is the saved one)."""
        main = accelerator.is_main_process
        self.sums = {
            name: torch.tensor(value if main else 0.0, dtype=torch.float64)
            for name, value in state.get("sums", {}).items()
        }
        self.count = state.get("count", 0) if main else 0


def batch_seed(seed: int, epoch: int, batch_index: int, process_index: int) -> int:
    """Seed of the random numbers (dropout) for one batch: a function of its position, so a resumed run draws
    the same ones as an uninterrupted run, whatever the data loader consumed while skipping ahead."""
    return int(np.random.SeedSequence([seed % 2**63, epoch, batch_index, process_index]).generate_state(1)[0])


def run_settings(cfg, world_size: int, train_clips: int) -> dict:
    """The position settings of this run (and its base model), as a checkpoint records them."""
    values = {"world_size": world_size, "train_clips": train_clips}
    values["stream_shuffle_buffer"] = cfg.shuffle_buffer if cfg.streaming else None
    values["stream_readers"] = max(1, cfg.num_workers) if cfg.streaming else None
    settings = {key: values[key] if key in values else getattr(cfg, key) for key in POSITION_SETTINGS}
    return {**settings, "base_model": cfg.base_model}


def check_position_settings(folder, saved: dict, current: dict) -> None:
    """The settings that define the data position and randomness are the ones the checkpoint was written with."""
    changed = [
        f"{key} {saved[key]!r} -> {current[key]!r}"
        for key in POSITION_SETTINGS
        if key in saved and key in current and saved[key] != current[key]
    ]
    if changed:
        raise CheckpointError(
            f"checkpoint {folder} was written with other settings than this run: {'; '.join(changed)}. A resumed "
            "run must keep them to continue with the same batches (world_size: number of processes; "
            "train_clips: clips in train_data after filtering)."
        )


@dataclass
class TrainState:
    """The loop's position and counters; ``step_in_epoch`` counts this process's batches of the epoch."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_total: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    skipped_in_a_row: int = 0
    window: MetricWindow = field(default_factory=MetricWindow)

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def record(self, accelerator, total_steps: int, settings: dict) -> dict:
        """``trainer_state.json`` of a checkpoint at this point (every process must call it: the window is reduced)."""
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "total_steps": total_steps,
            "skipped_nonfinite": self.skipped_total,
            "nonfinite_in_a_row": self.skipped_in_a_row,
            "metric_window": self.window.global_state(accelerator),
            "settings": settings,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    @classmethod
    def from_record(cls, record: dict, accelerator, batches_per_epoch: int | None) -> "TrainState":
        state = cls(
            record["global_step"],
            record["epoch"],
            record["step_in_epoch"],
            record.get("skipped_nonfinite", 0),
            record.get("nonfinite_in_a_row", 0),
        )
        state.window.load_global_state(record.get("metric_window", {}), accelerator)
        if batches_per_epoch is not None and state.step_in_epoch >= batches_per_epoch:  # saved at an epoch's end
            state.next_epoch()
        return state
