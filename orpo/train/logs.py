"""What a run writes as it goes: the console and ``train.log``, ``metrics.jsonl``, and the experiment trackers.

``metrics.jsonl`` holds one JSON record per report, ``{"step": N, "loss": ...}`` for training and
``{"step": N, "eval/loss": ...}`` for evaluations (step 0 is the base model when ``eval_before_train`` is
set); :func:`read_metrics` is its one reader.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from orpo.config import TrainConfig, config_to_dict
from orpo.errors import ConfigError


class TrainLog:
    """Console logging, and ``output_dir/train.log`` on the main process (appended to when resuming)."""

    FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

    def __init__(self, accelerator, output_dir: Path, append: bool):
        logging.basicConfig(format=self.FORMAT, level=logging.INFO if accelerator.is_main_process else logging.WARNING)
        self.handler = None
        self.root = logging.getLogger()
        self.level = self.root.level
        if accelerator.is_main_process:
            self.handler = logging.FileHandler(output_dir / "train.log", mode="a" if append else "w")
            self.handler.setFormatter(logging.Formatter(self.FORMAT))
            self.handler.setLevel(logging.INFO)
            self.root.addHandler(self.handler)
            if self.root.getEffectiveLevel() > logging.INFO:
                self.root.setLevel(logging.INFO)

    def close(self) -> None:
        if self.handler is not None:
            self.root.removeHandler(self.handler)
            self.handler.close()
            self.root.setLevel(self.level)


class MetricsLog:
    """Console lines and ``output_dir/metrics.jsonl`` (one JSON record per report), main process only."""

    def __init__(self, accelerator, output_dir: Path):
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.accelerator.log(metrics, step=step)
        if not self.accelerator.is_main_process:
            return
        tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON records of a metrics.jsonl file; a truncated last line (a run killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def logged_base_results(output_dir: str | Path) -> dict[str, float] | None:
    """The base model's evaluation (``eval/...`` at step 0) from ``output_dir/metrics.jsonl``, if logged.

    A resumed run does not evaluate the base model again; this gives the comparison its base column back.
    """
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    base = None
    for record in read_metrics(path):
        if record["step"] == 0 and any(k.startswith("eval/") for k in record):
            base = {k: v for k, v in record.items() if k.startswith("eval/")}
    return base


def check_trackers(cfg: TrainConfig) -> None:
    """Every tracker of ``report_to`` has its package installed (checked before any weights load)."""
    if not cfg.report_to:
        return
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for tracker in cfg.report_to:
        if tracker not in available:
            raise ConfigError(
                f"report_to names {tracker}, but its package is not installed here: "
                f"pip install {tracker.replace('_', '-')}, or leave {tracker} out of report_to"
            )


def init_trackers(accelerator, cfg: TrainConfig, output_dir: Path) -> None:
    """TensorBoard writes to output_dir/whisper-orpo; wandb keeps its files in output_dir and names the run after
    it; MLflow follows MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME (default ./mlruns, experiment whisper-orpo)."""
    tracker_config = {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_to_dict(cfg).items()
    }
    accelerator.init_trackers(
        "whisper-orpo",
        config=tracker_config,
        init_kwargs={
            "wandb": {"dir": str(output_dir), "name": output_dir.name},
            "mlflow": {"run_name": output_dir.name},
        },
    )
