"""`distbp plot`: loss and accuracy curves of runs from their metrics.jsonl, as one PNG (matplotlib)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .atomic import AtomicFile
from .safeio import check_output


SCORES = ("val_accuracy", "val_r2")  # higher is better, at most 1
ERRORS = ("val_rmse", "val_mae", "val_baseline_rmse")  # regression errors in the original target units


def read_metrics(run_dir) -> dict:
    """{"train": [(step, epoch, loss)], "eval": [(step, epoch, val_loss, {val metric: value})], "steps_per_epoch": P}."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl; HINT: give a run directory written by `distbp train` "
                        "(its --run-dir)")
    train, evals, per_epoch = {}, {}, None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        if rec.get("summary") and rec.get("epochs"):
            per_epoch = rec["steps"] / rec["epochs"]
        elif "loss" in rec and "step" in rec:
            train[rec["step"]] = (rec["step"], rec.get("epoch", 0), rec["loss"])  # a resumed run's
        elif "val_loss" in rec and "step" in rec:                                # later lines win
            evals[rec["step"]] = (rec["step"], rec.get("epoch", 0), rec["val_loss"],
                                  {k: v for k, v in rec.items() if k in SCORES + ERRORS})
    if not train and not evals:
        raise UserError(f"{path}: no train or eval records yet; HINT: plot after the run has logged steps")
    records = [*train.values(), *evals.values()]
    # a step s of epoch e has s <= (e + 1) P, with equality at the epoch's end
    per_epoch = per_epoch or max(r[0] / (r[1] + 1) for r in records)
    return {"train": sorted(train.values()), "eval": sorted(evals.values()), "steps_per_epoch": per_epoch}


def _pyplot_free_figure():
    """A matplotlib Figure drawn by the Agg backend, or a UserError naming the install command."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("distbp plot needs matplotlib; HINT: pip install 'distbp[plot]'") from None
    return Figure(figsize=(11, 7.5), layout="constrained")


def _plot_eval(axes, name: str, color: str, x: list, metrics: list[dict]):
    """Val scores (accuracy, R^2) on axes[0], regression errors (RMSE, MAE, baseline RMSE) on axes[1]."""
    for ax, keys in zip(axes, (SCORES, ERRORS)):
        for style, key in zip(("-", "--", ":"), keys):
            ys = [m.get(key) for m in metrics]
            if any(v is not None for v in ys):
                ax.plot(x, ys, color=color, linestyle=style, marker=".", label=f"{name} {key[4:]}")


def plot_runs(run_dirs, out, force: bool = False) -> Path:
    """Write a PNG: loss, val scores and (regression) val errors against steps (top) and epochs (bottom)."""
    out = check_output(out, [Path(d) / "metrics.jsonl" for d in run_dirs], force)
    runs = {str(d): read_metrics(d) for d in run_dirs}
    errors = any(k in m for r in runs.values() for *_, m in r["eval"] for k in ERRORS)
    fig = _pyplot_free_figure()
    axes = fig.subplots(2, 3 if errors else 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for (name, m), color in zip(runs.items(), colors):
        for row, scale in enumerate((1.0, 1.0 / m["steps_per_epoch"])):
            loss_ax = axes[row][0]
            if m["train"]:
                steps, _, loss = zip(*m["train"])
                loss_ax.plot([s * scale for s in steps], loss, color=color, label=f"{name} train")
            if m["eval"]:
                steps, _, val_loss, metrics = zip(*m["eval"])
                x = [s * scale for s in steps]
                loss_ax.plot(x, val_loss, color=color, linestyle="--", marker=".", label=f"{name} val")
                _plot_eval(axes[row][1:], name, color, x, metrics)
    for row, xlabel in enumerate(("step", "epoch")):
        titles = ("loss", "val accuracy / R^2", "val RMSE, MAE, baseline RMSE")
        for ax, title in zip(axes[row], titles):
            ax.set(xlabel=xlabel, ylabel=title, title=f"{title} by {xlabel}")
            ax.grid(True, alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize="small")
        axes[row][0].set(yscale="log")
        if not axes[row][1].has_data():
            axes[row][1].text(0.5, 0.5, "no val scores (no val split)", ha="center", transform=axes[row][1].transAxes)
    try:
        with AtomicFile(out) as target:
            fig.savefig(target.tmp, dpi=100, format=out.suffix[1:] or "png")
            target.commit(durable=True)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}); HINT: choose a writable -o OUT.png") from None
    except ValueError as e:  # a suffix matplotlib has no writer for
        raise UserError(f"cannot write {out}: {e}; HINT: name it .png, .pdf or .svg") from None
    return out
