"""Task metrics from global sums (exact over ranks): accuracy, RMSE/MAE/R^2 with the constant baseline,
the per-class report and confusion matrix, and which metric "best" means."""
from __future__ import annotations

import math

import numpy as np

from ..errors import UserError
from ..nn.sequence_loss import SequenceCrossEntropy

MAXIMIZED = ("val_accuracy", "val_r2", "val_f1_macro", "val_roc_auc")
BEST_CHOICES = ("auto", "val_loss", "val_accuracy", "val_f1_macro", "val_roc_auc", "val_rmse", "val_mae", "val_r2",
                "val_perplexity")
AUC_BINS = 1 << 16  # score histogram bins of the ROC-AUC


def monitored(best_metric: str, task) -> tuple[str, str]:
    """(metric name, direction "max" or "min"): what train.best_metric makes "best" for the Task."""
    name = task.best if best_metric == "auto" else best_metric
    if name not in task.metrics:
        raise UserError(f"train.best_metric={best_metric!r} is not reported for a {task} task; "
                         f"HINT: set it to auto or one of {', '.join(task.metrics)}")
    return name, "max" if name in MAXIMIZED else "min"


def improved(value: float, best: float | None, direction: str) -> bool:
    """Whether value beats best (None = nothing yet) in the direction "max" or "min"."""
    return best is None or (value > best if direction == "max" else value < best)


class RegressionSums:
    """Per-output sums of squared and absolute errors and of target deviations from the train mean."""

    def __init__(self, k: int, y_mean: np.ndarray):
        self.y_mean = y_mean
        self.buf = np.zeros((4, k))  # squared error, absolute error, y - mean, (y - mean)^2

    def add(self, pred: np.ndarray, y: np.ndarray):
        """Add one chunk: predictions and targets (rows, k) in the original units."""
        d, dev = pred - y, y - self.y_mean
        self.buf += (np.square(d).sum(0), np.abs(d).sum(0), dev.sum(0), np.square(dev).sum(0))

    def add_chunk(self, out_units: np.ndarray, out: np.ndarray, y: np.ndarray):
        """Add one chunk of evaluation: outputs in the targets' units, raw outputs, targets as stored."""
        self.add(out_units.astype(np.float64), y.reshape(len(y), -1).astype(np.float64))

    def metrics(self, rows: float) -> dict:
        """RMSE, MAE, R^2 (mean over outputs, as scikit-learn's r2_score) and the train-mean baseline's RMSE."""
        sse, sae, dev, ss_mean = self.buf
        n, k = max(rows, 1), self.buf.shape[1]
        ss_tot = ss_mean - np.square(dev) / n  # sum (y - val mean)^2, from deviations about the train mean
        r2 = np.where(ss_tot > 0, 1 - sse / np.where(ss_tot > 0, ss_tot, 1), np.where(sse == 0, 1.0, 0.0))
        return {"val_rmse": float(np.sqrt(sse.sum() / (n * k))), "val_mae": float(sae.sum() / (n * k)),
                "val_r2": float(r2.mean()), "val_baseline_rmse": float(np.sqrt(ss_mean.sum() / (n * k)))}


class PerplexitySums:
    """The summed token loss of a sequence model, for the perplexity exp(mean token loss)."""

    def __init__(self):
        self.loss = SequenceCrossEntropy()
        self.buf = np.zeros(1)

    def add_chunk(self, out_units: np.ndarray, out: np.ndarray, y: np.ndarray):
        """Add one chunk's sum over rows of the rows' mean token loss."""
        self.buf[0] += self.loss.forward(out, y)

    def metrics(self, rows: float) -> dict:
        """{"val_perplexity": exp(nats per token)}, at most e^700 (no overflow)."""
        return {"val_perplexity": math.exp(min(self.buf[0] / max(rows, 1), 700.0))}


class ConfusionSums:
    """The confusion matrix of a classification, and from it the per-class report."""

    def __init__(self, k: int, class_names: list[str]):
        self.k, self.names = k, class_names
        self.buf = np.zeros((k, k))

    def add_chunk(self, out_units: np.ndarray, out: np.ndarray, y: np.ndarray):
        """Count one chunk's (true class, predicted class) pairs."""
        self.buf += confusion(out.argmax(axis=1), y, self.k)

    def metrics(self, rows: float) -> dict:
        """{"report": the per-class report}."""
        return {"report": class_report(self.buf, self.names)}


class F1Sums:
    """The confusion matrix of a classification, for the F1 score averaged over classes (scikit-learn's
    f1_score(average="macro"), zero_division 0)."""

    def __init__(self, k: int):
        self.k, self.buf = k, np.zeros((k, k))

    def add_chunk(self, out_units: np.ndarray, out: np.ndarray, y: np.ndarray):
        """Count one chunk's (true class, predicted class) pairs."""
        self.buf += confusion(out.argmax(axis=1), y, self.k)

    def metrics(self, rows: float) -> dict:
        """{"val_f1_macro": ...}."""
        return {"val_f1_macro": class_report(self.buf)["macro avg"]["f1-score"]}


class AucSums:
    """Histograms of the positive and negative rows' scores per output, for the ROC-AUC (scikit-learn's
    roc_auc_score, averaged over outputs): exact unless rows of both labels share one of AUC_BINS bins."""

    def __init__(self, k: int):
        self.k, self.buf = k, np.zeros((k, 2, AUC_BINS))

    def add_chunk(self, out_units: np.ndarray, out: np.ndarray, y: np.ndarray):
        """Count one chunk's sigmoid scores by label."""
        p = 1 / (1 + np.exp(-out.astype(np.float64)))  # (rows, k)
        bins = np.minimum((p * AUC_BINS).astype(np.int64), AUC_BINS - 1)
        positive = y.reshape(len(y), -1) >= 0.5  # probability targets count on the side of 0.5 they are
        for j in range(self.k):
            for label in (False, True):
                self.buf[j, int(label)] += np.bincount(bins[positive[:, j] == label, j], minlength=AUC_BINS)

    def metrics(self, rows: float) -> dict:
        """{"val_roc_auc": ...}: P(score of a positive > score of a negative), ties counted half."""
        aucs = []
        for neg, pos in self.buf:
            below = np.cumsum(neg) - neg  # negatives in lower bins
            pairs = pos.sum() * neg.sum()
            aucs.append(float((pos * (below + neg / 2)).sum() / pairs) if pairs else 0.5)
        return {"val_roc_auc": float(np.mean(aucs))}


def confusion(pred: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts: row = true class, column = predicted class."""
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)


def class_report(cm: np.ndarray, names: list[str] | None = None) -> dict:
    """Per-class precision, recall, F1 and support, accuracy, macro and weighted averages (zero_division 0)."""
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    pr = precision + recall
    f1 = np.divide(2 * precision * recall, pr, out=np.zeros_like(tp), where=pr > 0)
    names = names or [str(i) for i in range(len(tp))]
    total = support.sum()
    rows = {n: {"precision": p, "recall": r, "f1-score": f, "support": int(s)}
            for n, p, r, f, s in zip(names, precision, recall, f1, support)}
    avg = {"macro avg": np.ones_like(support) / len(support), "weighted avg": support / max(total, 1)}
    for name, w in avg.items():
        rows[name] = {"precision": float(w @ precision), "recall": float(w @ recall), "f1-score": float(w @ f1),
                      "support": int(total)}
    report = {n: {k: float(v) if k != "support" else v for k, v in r.items()} for n, r in rows.items()}
    report["accuracy"] = float(tp.sum() / max(total, 1))
    report["confusion_matrix"] = cm.astype(np.int64).tolist()
    return report


def format_report(report: dict, digits: int = 2) -> list[str]:
    """scikit-learn's classification_report layout, then the confusion matrix (rows true, columns predicted)."""
    classes = [n for n in report if n not in ("accuracy", "confusion_matrix", "macro avg", "weighted avg")]
    width = max(len("weighted avg"), *(len(n) for n in classes))
    head = ["precision", "recall", "f1-score", "support"]
    lines = [f"{'':>{width}} " + "".join(f" {h:>9}" for h in head), ""]
    row = "{:>{w}} " + " {:>9.{d}f}" * 3 + " {:>9}"
    for n in classes:
        r = report[n]
        lines.append(row.format(n, r["precision"], r["recall"], r["f1-score"], r["support"], w=width, d=digits))
    total = report["macro avg"]["support"]
    lines += ["", f"{'accuracy':>{width}} " + f" {'':>9}" * 2 + f" {report['accuracy']:>9.{digits}f} {total:>9}"]
    for n in ("macro avg", "weighted avg"):
        r = report[n]
        lines.append(row.format(n, r["precision"], r["recall"], r["f1-score"], r["support"], w=width, d=digits))
    cm = np.asarray(report["confusion_matrix"])
    cell = max(len(str(cm.max())), *(len(n) for n in classes))
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)",
              f"{'':>{width}} " + " ".join(f"{n:>{cell}}" for n in classes)]
    lines += [f"{n:>{width}} " + " ".join(f"{v:>{cell}}" for v in r) for n, r in zip(classes, cm)]
    return lines
