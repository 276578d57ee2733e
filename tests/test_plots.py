"""orpo/plots.py: training_curves.png from metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from orpo.plots import main
from orpo.train.logs import read_metrics
from orpo.train.plots import plot_training_curves, series


def write_metrics(folder, records, tail: str = ""):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def demo_records():
    records = [
        {
            "step": 0,
            "eval/loss": 0.71,
            "eval/nll_loss": 0.66,
            "eval/rewards/margins": 0.035,
            "eval/rewards/accuracies": 0.7,
            "eval/wer": 0.216,
        }
    ]
    for step in range(2, 17, 2):
        records.append(
            {
                "step": step,
                "loss": 0.7 / step,
                "nll_loss": 0.6 / step,
                "rewards/margins": 0.005 * step,
                "rewards/accuracies": min(1.0, 0.1 * step),
                "learning_rate": 1e-5 * (1 - step / 16),
                "epoch": step / 8,
                "grad_norm": 3.0,
            }
        )
        if step % 8 == 0:
            records.append(
                {
                    "step": step,
                    "eval/loss": 0.5 - 0.01 * step,
                    "eval/nll_loss": 0.45,
                    "eval/rewards/margins": 0.05,
                    "eval/rewards/accuracies": 0.7,
                    "eval/wer": 0.2 - 0.003 * step,
                    "eval/cer": 0.1,
                }
            )
    return records


def image_shape(path):
    from matplotlib.image import imread

    return imread(path).shape


def test_plot_writes_a_png(tmp_path):
    write_metrics(tmp_path, demo_records())
    path = plot_training_curves(tmp_path)
    assert path == tmp_path / "training_curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = image_shape(path)
    assert width >= 1200 and height >= 700
    assert not list(tmp_path.glob("*.tmp.png"))


def test_series_sorts_by_step_and_keeps_the_latest_value_of_a_repeated_step(tmp_path):
    # A resumed run appends: steps 4 and 6 are logged twice; a NaN and a boolean are skipped.
    records = [
        {"step": 2, "loss": 1.0},
        {"step": 4, "loss": 0.9},
        {"step": 6, "loss": 0.8},
        {"step": 4, "loss": 0.7},
        {"step": 6, "loss": float("nan")},
        {"step": 8, "loss": True},
        {"step": 8, "eval/loss": 0.5},
    ]
    path = write_metrics(tmp_path, records, tail='{"step": 10, "loss": 0.')  # cut mid-write
    loaded = read_metrics(path)
    assert len(loaded) == 7
    assert series(loaded, "loss") == ([2, 4, 6], [1.0, 0.7, 0.8])
    assert series(loaded, "eval/loss") == ([8], [0.5])
    assert series(loaded, "eval/wer") == ([], [])


def test_plot_without_eval_records_or_any_records(tmp_path):
    write_metrics(tmp_path / "train-only", [r for r in demo_records() if "loss" in r])
    assert plot_training_curves(tmp_path / "train-only").is_file()
    write_metrics(tmp_path / "empty", [])
    assert plot_training_curves(tmp_path / "empty").is_file()


def test_missing_metrics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_training_curves(tmp_path)


def test_command(tmp_path, capsys):
    write_metrics(tmp_path, demo_records())
    assert main([str(tmp_path)]) == 0
    assert "training_curves.png" in capsys.readouterr().out
    assert main([]) == 2
    assert main([str(tmp_path / "nowhere")]) == 2


@pytest.mark.parametrize("records", [demo_records(), []], ids=["with data", "no data"])
def test_every_panel_has_a_y_axis_label(tmp_path, monkeypatch, records):
    from matplotlib.figure import Figure

    drawn, savefig = [], Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    write_metrics(tmp_path, records)
    plot_training_curves(tmp_path)
    (fig,) = drawn
    assert len(fig.axes) == 6
    for ax in fig.axes:
        assert ax.get_ylabel().strip(), f"panel {ax.get_title()!r} has no y-axis label"
        assert ax.get_xlabel() == "optimizer step"
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert len(set(labels)) == 6  # each says what its own axis measures
