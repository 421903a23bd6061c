"""distbp plot: metrics.jsonl read back (resumes, epochs) and a real PNG written."""
import json
import sys

import numpy as np
import pytest

from distbp.errors import UserError
from distbp.plot import plot_runs, read_metrics


def write_run(run_dir, per_epoch=10, epochs=3, resume_at=None, summary=True):
    """A metrics.jsonl as distbp train writes it; a resume repeats the steps after resume_at."""
    run_dir.mkdir()
    lines = []
    for step in range(1, per_epoch * epochs + 1):
        epoch = (step - 1) // per_epoch
        lines.append({"step": step, "epoch": epoch, "loss": 2.0 / step, "lr": 0.1, "samples_per_s": 1000.0})
        if step % per_epoch == 0:
            lines.append({"step": step, "epoch": epoch, "val_loss": 1.0 / step, "val_accuracy": step / 40})
        if resume_at and step == resume_at + 5:  # killed here, resumed from the checkpoint at resume_at
            lines.append({"resume": True, "step": resume_at, "epoch": resume_at // per_epoch, "world_size": 2})
            lines += [{"step": s, "epoch": (s - 1) // per_epoch, "loss": 9.0, "lr": 0.1, "samples_per_s": 1.0}
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


def test_plot_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no metrics.jsonl.*--run-dir"):
        plot_runs([tmp_path], tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(UserError, match=r"pip install 'distbp\[plot\]'"):
        plot_runs([write_run(tmp_path / "a")], tmp_path / "x.png")
