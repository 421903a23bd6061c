"""`distbp plot`: loss and accuracy curves of runs from their metrics.jsonl, as one PNG (matplotlib)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..files.atomic import AtomicFile
from ..files.safeio import check_output


SCORES = ("val_accuracy", "val_r2")  # higher is better, at most 1
ERRORS = ("val_rmse", "val_mae", "val_baseline_rmse")  # regression errors in the original target units


def read_metrics(run_dir) -> dict:
    """{"train": [(step, epoch, loss)], "eval": [(step, epoch, val_loss, {val metric: value})], "epochs": [(step,
    train_loss, train_accuracy or None)] (the epoch means), "steps_per_epoch": P}."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl; HINT: give a run directory written by `distbp train` "
                        "(its --run-dir)")
    train, evals, epochs, per_epoch = {}, {}, {}, None
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError, ValueError):
            continue  # a line cut short by a killed run
        if not _plottable(rec):
            continue  # not a record distbp writes (a foreign or damaged line)
        if rec.get("summary") and rec.get("epochs"):
            per_epoch = rec["steps"] / rec["epochs"]
            continue
        if "train_loss" in rec and "step" in rec:  # an epoch's end (on its own line or an eval line)
            epochs[rec["step"]] = (rec["step"], rec["train_loss"], rec.get("train_accuracy"))
        if "loss" in rec and "step" in rec:
            train[rec["step"]] = (rec["step"], rec.get("epoch", 0), rec["loss"])  # a resumed run's
        elif "val_loss" in rec and "step" in rec:                                # later lines win
            evals[rec["step"]] = (rec["step"], rec.get("epoch", 0), rec["val_loss"],
                                  {k: v for k, v in rec.items() if k in SCORES + ERRORS})
    if not train and not evals:
        raise UserError(f"{path}: no train or eval records yet; HINT: plot after the run has logged steps")
    records = [*train.values(), *evals.values()]
    # a step s of (1-based) epoch e has s <= e P, with equality at the epoch's end
    per_epoch = per_epoch or max(r[0] / max(r[1], 1) for r in records)
    return {"train": sorted(train.values()), "eval": sorted(evals.values()), "epochs": sorted(epochs.values()),
            "steps_per_epoch": per_epoch}


def _number(v) -> bool:
    """True for an int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _plottable(rec) -> bool:
    """True if rec is a record whose fields the plot reads are numbers (steps, epochs and losses)."""
    return isinstance(rec, dict) and all(_number(rec[k]) for k in ("step", "epoch", "loss", "val_loss", "steps",
                                                                     "epochs") if k in rec) \
        and all(_number(v) for k, v in rec.items() if k in SCORES + ERRORS)


def ema(values, weight: float | None = None) -> list[float]:
    """Exponential moving average with the start-up bias removed (TensorBoard's smoothing).

    The default weight averages over about 5% of the points (0.6 to 0.98)."""
    weight = min(0.98, max(0.6, 1 - 20 / max(len(values), 1))) if weight is None else weight
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def short_names(run_dirs) -> list[str]:
    """Run directories without the leading and trailing text they all share (cut at / - _), e.g. lr0.1, lr0.01."""
    names = [Path(d).resolve().as_posix() for d in run_dirs]
    if len(names) == 1:
        return [Path(names[0]).name]
    prefix = os.path.commonprefix(names)
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
    cut_front = max(prefix.rfind(c) for c in "/-_") + 1
    cut_back = min([i for i in (suffix.find(c) for c in "/-_") if i >= 0] or [len(suffix)])
    short = [n[cut_front:len(n) - len(suffix) + cut_back] for n in names]
    return short if all(short) and len(set(short)) == len(short) else names


def _pyplot_free_figure(figsize=(13, 7.5)):
    """A matplotlib Figure drawn by the Agg backend, or a UserError naming the install command."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plots need matplotlib; HINT: pip install 'distbp[plot]'") from None
    return Figure(figsize=figsize, layout="constrained")


ERROR_STYLES = {"val_rmse": "--", "val_mae": "-.", "val_baseline_rmse": ":"}  # val curves: never solid


def _legend(fig, names, colors, epoch_means: bool):
    """One legend outside the axes: a colour per run, a line style per curve (solid train, dashed val)."""
    from matplotlib.lines import Line2D
    runs = [Line2D([], [], color=c, lw=2, label=n) for n, c in zip(names, colors)]
    solid = "train loss / accuracy (epoch mean)" if epoch_means else "train loss (EMA)"
    styles = [Line2D([], [], color="0.3", lw=1.6, marker="." if epoch_means else None, label=solid),
              Line2D([], [], color="0.3", lw=0.8, alpha=0.3, label="train loss (batches)"),
              Line2D([], [], color="0.3", lw=1.2, ls="--", label="val loss / accuracy / R^2")]
    fig.legend(handles=runs + styles, loc="outside right upper", fontsize="small", frameon=False)


def _error_legend(ax):
    """The regression errors' panel: which dash is which error (in grey: the colours are the runs')."""
    from matplotlib.lines import Line2D
    ax.legend(handles=[Line2D([], [], color="0.3", ls=style, label=key[4:].replace("_", " ").upper()
                              .replace("BASELINE RMSE", "baseline RMSE (train mean)"))
                       for key, style in ERROR_STYLES.items()], fontsize="small")


def _plot_eval(axes, color: str, x: list, metrics: list[dict]):
    """Val scores (accuracy, R^2) dashed on axes[0], regression errors (RMSE, MAE, baseline RMSE) on axes[1]."""
    marker = "." if len(x) <= 40 else None
    for key in SCORES:
        ys = [m.get(key) for m in metrics]
        if any(v is not None for v in ys):
            axes[0].plot(x, ys, color=color, ls="--", marker=marker)
    for key, style in ERROR_STYLES.items():
        ys = [m.get(key) for m in metrics]
        if len(axes) > 1 and any(v is not None for v in ys):
            axes[1].plot(x, ys, color=color, ls=style, marker=marker)


def plot_runs(run_dirs, out, force: bool = False) -> Path:
    """Write make_figure's image (PNG, or PDF/SVG by the suffix; a name without one gets .png, as in
    matplotlib) atomically, never over an input."""
    out = Path(out) if Path(out).suffix else Path(f"{out}.png")
    out = check_output(out, [Path(d) / "metrics.jsonl" for d in run_dirs], force)
    return save_figure(make_figure(run_dirs), out)


def save_figure(fig, out: Path) -> Path:
    """fig written to out atomically, in the format its suffix names; a UserError saying why it cannot be."""
    try:
        with AtomicFile(out) as target:
            fig.savefig(target.tmp, dpi=100, format=out.suffix[1:] or "png")
            target.commit(durable=True)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}); HINT: choose a writable -o OUT.png") from None
    except ValueError as e:  # a suffix matplotlib has no writer for
        raise UserError(f"cannot write {out}: {e}; HINT: name it .png, .pdf or .svg") from None
    return out


def make_figure(run_dirs):
    """Loss, val scores (accuracy, R^2) and, for regression, val errors against steps (top row) and epochs
    (bottom row), runs overlaid, legend outside."""
    runs = [read_metrics(d) for d in run_dirs]
    names = short_names(run_dirs)
    errors = any(k in m for r in runs for *_, m in r["eval"] for k in ERRORS)
    fig = _pyplot_free_figure()
    axes = fig.subplots(2, 3 if errors else 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for m, color in zip(runs, colors):
        for row, scale in enumerate((1.0, 1.0 / m["steps_per_epoch"])):
            loss_ax = axes[row][0]
            if m["train"]:
                steps, _, loss = zip(*m["train"])
                x = [s * scale for s in steps]
                loss_ax.plot(x, loss, color=color, lw=0.8, alpha=0.3)
                if not m["epochs"]:  # a run from before epoch means: the batches smoothed
                    loss_ax.plot(x, ema(loss), color=color, lw=1.6)
            if m["epochs"]:
                steps, loss, accuracy = zip(*m["epochs"])
                x = [s * scale for s in steps]
                marker = "." if len(x) <= 40 else None
                loss_ax.plot(x, loss, color=color, lw=1.6, marker=marker)
                if any(a is not None for a in accuracy):
                    axes[row][1].plot(x, accuracy, color=color, lw=1.6, marker=marker)
            if m["eval"]:
                steps, _, val_loss, metrics = zip(*m["eval"])
                x = [s * scale for s in steps]
                marker = "." if len(x) <= 40 else None  # 200 epochs of dots hide the line
                loss_ax.plot(x, val_loss, color=color, lw=1.2, ls="--", marker=marker)
                _plot_eval(axes[row][1:], color, x, metrics)
    regression = any("val_r2" in m for r in runs for *_, m in r["eval"])
    score = "val R^2" if regression else "accuracy (train, val)"
    for row, xlabel in enumerate(("step", "epoch")):
        titles = ("loss (MSE, standardized targets)" if regression else "loss (cross-entropy)", score,
                  "val errors (target units)")
        for ax, title in zip(axes[row], titles):
            ax.set(xlabel=xlabel, ylabel=title, title=f"{title.split(' (')[0]} against {xlabel}s")
            ax.grid(True, alpha=0.3)
        axes[row][0].set(yscale="log")
        if errors:
            _error_legend(axes[row][2])
        if not axes[row][1].has_data():
            axes[row][1].text(0.5, 0.5, "no val scores (no val split)", ha="center", transform=axes[row][1].transAxes)
    _legend(fig, names, colors, any(r["epochs"] for r in runs))
    return fig
