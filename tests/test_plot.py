"""distbp plot: metrics.jsonl read back (resumes, epochs) and a real PNG written."""
import io
import json
import sys

import numpy as np
import pytest

from distbp.errors import UserError
from distbp.reporting.plot import ema, make_figure, plot_runs, read_metrics, short_names


def write_run(run_dir, per_epoch=10, epochs=3, resume_at=None, summary=True):
    """A metrics.jsonl as distbp train writes it; a resume repeats the steps after resume_at."""
    run_dir.mkdir()
    lines = []
    for step in range(1, per_epoch * epochs + 1):
        epoch = (step - 1) // per_epoch + 1
        lines.append({"step": step, "epoch": epoch, "loss": 2.0 / step, "lr": 0.1, "samples_per_s": 1000.0})
        if step % per_epoch == 0:
            lines.append({"step": step, "epoch": epoch, "val_loss": 1.0 / step, "val_accuracy": step / 40})
        if resume_at and step == resume_at + 5:  # killed here, resumed from the checkpoint at resume_at
            lines.append({"resume": True, "step": resume_at, "epoch": (resume_at - 1) // per_epoch + 1,
                          "world_size": 2})
            lines += [{"step": s, "epoch": (s - 1) // per_epoch + 1, "loss": 9.0, "lr": 0.1, "samples_per_s": 1.0}
                      for s in range(resume_at + 1, resume_at + 3)]
    if summary:
        lines.append({"summary": True, "steps": per_epoch * epochs, "epochs": float(epochs)})
    (run_dir / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    return run_dir


def test_read_metrics_keeps_the_last_record_per_step_and_finds_steps_per_epoch(tmp_path):
    m = read_metrics(write_run(tmp_path / "a", resume_at=12))
    steps = [r[0] for r in m["train"]]
    assert steps == sorted(set(steps)) == list(range(1, 31))
    assert m["train"][12][2] == 9.0  # step 13 as logged after the resume
    assert m["steps_per_epoch"] == 10 and [r[0] for r in m["eval"]] == [10, 20, 30]
    unfinished = read_metrics(write_run(tmp_path / "b", per_epoch=7, summary=False))
    assert unfinished["steps_per_epoch"] == 7


def test_plot_writes_a_png_matplotlib_can_read(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", per_epoch=5, epochs=4)
    out = plot_runs([a, b], tmp_path / "runs.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    pixels = image.imread(out)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600 and np.ptp(pixels) > 0.5


def test_plot_output_without_a_suffix_gets_png_as_in_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_runs([write_run(tmp_path / "a")], tmp_path / "curves")
    assert out == tmp_path / "curves.png" and out.read_bytes()[:4] == b"\x89PNG"


def test_plot_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no metrics.jsonl.*--run-dir"):
        plot_runs([tmp_path], tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(UserError, match=r"pip install 'distbp\[plot\]'"):
        plot_runs([write_run(tmp_path / "a")], tmp_path / "x.png")


def test_ema_smooths_noise_and_starts_at_the_first_value():
    noisy = 1.0 + np.where(np.arange(400) % 2, 0.5, -0.5)
    smooth = np.array(ema(noisy))
    assert smooth[0] == noisy[0]  # no bias toward 0 at the start
    assert np.ptp(smooth[200:]) < 0.1 * np.ptp(noisy) and abs(smooth[-1] - 1.0) < 0.05
    assert ema([3.0, 3.0, 3.0], weight=0.9) == pytest.approx([3.0, 3.0, 3.0])


def test_run_names_keep_their_distinct_parts():
    assert short_names(["runs/2026-12-01-lr0.1", "runs/2026-12-01-lr0.01"]) == ["lr0.1", "lr0.01"]
    assert short_names(["exp/mnist/seed0", "exp/cifar/seed0"]) == ["mnist", "cifar"]
    assert short_names(["runs/a"]) == ["a"]
    same = short_names(["runs/a", "runs/a"])
    assert same[0] == same[1] and same[0].endswith("runs/a")  # nothing distinct: the full paths


def test_200_epochs_of_several_runs_legend_outside_the_curves(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [write_run(tmp_path / f"2026-lr{lr}", per_epoch=22, epochs=200) for lr in ("0.1", "0.01", "0.03")]
    fig = make_figure(runs)
    fig.savefig(io.BytesIO(), dpi=100)  # lays the figure out as plot_runs does
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:3] == ["lr0.1", "lr0.01", "lr0.03"] and "train loss (EMA)" in labels
    box = legend.get_window_extent()
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    loss_ax = fig.axes[2]  # loss against epochs: raw (faint) and smoothed train loss, val loss without markers
    raw, smooth, val = loss_ax.get_lines()[:3]
    assert raw.get_alpha() < 0.5 and smooth.get_alpha() in (None, 1.0) and val.get_marker() in ("None", None, "")
    assert max(smooth.get_xdata()) == pytest.approx(200)  # epochs run 1..200, the last ending at 200
    assert np.std(np.diff(smooth.get_ydata())) < np.std(np.diff(raw.get_ydata()))


def test_epoch_means_solid_val_dashed_and_the_error_panel_legend(tmp_path):
    run = tmp_path / "reg"
    run.mkdir()
    lines = [{"step": s, "epoch": s // 2, "loss": 1.0 / s, "lr": 0.1} for s in (1, 2, 3, 4)]
    lines += [{"step": s, "epoch": s // 2, "train_loss": 1.0 / s, "val_loss": 1.2 / s, "val_rmse": 2.0, "val_mae": 1.5,
               "val_r2": 0.5, "val_baseline_rmse": 3.0} for s in (2, 4)]
    lines.append({"summary": True, "steps": 4, "epochs": 2.0})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    fig = make_figure([run])
    loss_ax, score_ax, error_ax = fig.axes[:3]
    styles = {(tuple(line.get_xdata()), line.get_linestyle()) for line in loss_ax.get_lines()}
    assert ((2, 4), "-") in styles and ((2, 4), "--") in styles  # train epoch means solid, val dashed
    assert all(line.get_linestyle() == "--" for line in score_ax.get_lines())  # R^2: val only
    assert [t.get_text() for t in error_ax.get_legend().get_texts()] == ["RMSE", "MAE", "baseline RMSE (train mean)"]
    assert loss_ax.get_ylabel() == "loss (MSE, standardized targets)" and score_ax.get_ylabel() == "val R^2"
    (legend,) = fig.legends
    assert "train loss / accuracy (epoch mean)" in [t.get_text() for t in legend.get_texts()]
