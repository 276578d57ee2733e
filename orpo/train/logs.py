"""What a run writes as it goes: the console and ``train.log``, ``metrics.jsonl``, and the experiment trackers.

``metrics.jsonl`` holds one JSON record per report, ``{"step": N, "loss": ...}`` for training and
``{"step": N, "eval/loss": ...}`` for evaluations (step 0 is the base model when ``eval_before_train`` is
set); :func:`read_metrics` is its one reader.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from orpo.config import TrainConfig, config_to_dict
from orpo.errors import ConfigError

# The per-step metric lines: printed with tqdm.write (beside the progress bar), and through this logger into
# train.log only (it does not propagate to the console's handlers).
metrics_logger = logging.getLogger("orpo.metrics")
metrics_logger.propagate = False


class _Held(logging.Handler):
    """Keeps the records logged before ``train.log`` may be written (the checks of a run), to write them there."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class TrainLog:
    """Console logging, and ``output_dir/train.log`` on the main process (appended to when resuming): every
    log record, the metric lines of :class:`MetricsLog`, and at the end the run's total wall time.

    The file is opened only once every check has passed (:meth:`open_file`); what was logged before that is
    held in memory and written first, so ``train.log`` still tells the whole run.
    """

    FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

    def __init__(self, accelerator):
        logging.basicConfig(format=self.FORMAT, level=logging.INFO if accelerator.is_main_process else logging.WARNING)
        self.started = time.monotonic()
        self.main = accelerator.is_main_process
        self.handler = None
        self.root = logging.getLogger()
        self.level = self.root.level
        self.held = _Held() if self.main else None
        if self.main:
            self.root.addHandler(self.held)
            if self.root.getEffectiveLevel() > logging.INFO:
                self.root.setLevel(logging.INFO)

    def open_file(self, output_dir: Path, append: bool) -> None:
        if not self.main:
            return
        self.handler = logging.FileHandler(output_dir / "train.log", mode="a" if append else "w")
        self.handler.setFormatter(logging.Formatter(self.FORMAT))
        self.handler.setLevel(logging.INFO)
        self.root.removeHandler(self.held)
        for record in self.held.records:
            self.handler.handle(record)
        self.held = None
        self.root.addHandler(self.handler)
        metrics_logger.addHandler(self.handler)
        metrics_logger.setLevel(logging.INFO)

    def close(self) -> None:
        if self.held is not None:
            self.root.removeHandler(self.held)
        if self.handler is not None:
            logging.getLogger("orpo").info("total wall time: %s", format_duration(time.monotonic() - self.started))
            metrics_logger.removeHandler(self.handler)
            self.root.removeHandler(self.handler)
            self.handler.close()
        self.root.setLevel(self.level)


def format_duration(seconds: float) -> str:
    """'42.3 s', '3 min 05 s' or '2 h 07 min 09 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


class MetricsLog:
    """Console lines and ``output_dir/metrics.jsonl`` (one JSON record per report), main process only."""

    def __init__(self, accelerator, output_dir: Path):
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.accelerator.log(metrics, step=step)
        if not self.accelerator.is_main_process:
            return
        line = f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        tqdm.write(line)
        metrics_logger.info(line)
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
    """The base model's evaluation (``eval/...`` and ``regression/...`` at step 0) from ``output_dir/metrics.jsonl``,
    if logged.

    A resumed run does not evaluate the base model again; this gives the comparison its base column back, and
    the forgetting guard its reference.
    """
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    base = None
    for record in read_metrics(path):
        evaluated = {k: v for k, v in record.items() if k.startswith(("eval/", "regression/"))}
        if record["step"] == 0 and evaluated:
            base = evaluated
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


TENSORBOARD_DIR = "whisper-orpo"  # output_dir/whisper-orpo/RUN: one TensorBoard run per launch


def tensorboard_run_name(folder: Path) -> str:
    """The start time (``20261202-135016``), with ``-2``, ``-3``, ... when ``folder`` holds that run already."""
    name = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = name, 1
    while (folder / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def init_trackers(accelerator, cfg: TrainConfig, output_dir: Path) -> None:
    """TensorBoard writes to output_dir/whisper-orpo/START_TIME, so a rerun (or a resumed run) into the same
    output_dir is a run of its own rather than more points on the last one; wandb keeps its files in output_dir
    and names the run after it; MLflow follows MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME (default ./mlruns,
    experiment whisper-orpo)."""
    from accelerate.tracking import TensorBoardTracker

    tracker_config = {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_to_dict(cfg).items()
    }
    if accelerator.is_main_process and any(str(t) == "tensorboard" for t in accelerator.log_with):
        folder = output_dir / TENSORBOARD_DIR
        run = tensorboard_run_name(folder)
        accelerator.log_with = [
            TensorBoardTracker(run, folder) if str(t) == "tensorboard" else t for t in accelerator.log_with
        ]
        logging.getLogger("orpo").info("TensorBoard run: %s (tensorboard --logdir %s)", folder / run, output_dir)
    accelerator.init_trackers(
        "whisper-orpo",
        config=tracker_config,
        init_kwargs={
            "wandb": {"dir": str(output_dir), "name": output_dir.name},
            "mlflow": {"run_name": output_dir.name},
        },
    )
