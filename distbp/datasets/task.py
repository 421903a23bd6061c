"""The dataset's task: what its targets are, and everything that follows from that.

One class per task owns the task-specific choices of every command: the targets' dtype and
checks when a file is read or converted, the default loss, the validation metrics and which
of them "best" means, how model outputs become predictions, and the root attributes of a
file. A new task is one subclass here registered in TASKS (plus its tests); nothing else
compares task names.
"""
from __future__ import annotations

import json

import numpy as np

from ..nn.losses import MSE, BCEWithLogits, SoftmaxCrossEntropy
from ..nn.sequence_loss import SequenceCrossEntropy
from ..reporting.scores import AucSums, ConfusionSums, F1Sums, PerplexitySums, RegressionSums


def not_finite(block: np.ndarray) -> np.ndarray:
    """Rows of a block holding NaN or Inf."""
    return ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed in float64 with the row max subtracted."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True), dtype=np.float64)
    return z / z.sum(axis=1, keepdims=True)


class TaskError(ValueError):
    """Targets or settings that do not fit the task; the caller names the file or key."""


class BadTarget(TaskError):
    """A target value the task cannot take, at `row` of the block; problem has a {row} field."""

    def __init__(self, row: int, problem: str):
        super().__init__(problem)
        self.row, self.problem = int(row), problem


class Task:
    """The float-target tasks' common ground; subclasses set what differs."""

    name = ""
    metrics = ("val_loss",)  # what evaluation reports, in this order
    best = "val_loss"  # train.best_metric "auto"
    accuracy = False  # whether a share of correct outputs is reported (train lines, val_accuracy)
    labels = False  # whether targets are class labels (int64, text names allowed, stratified splits)
    normalizes_targets = False  # whether data.normalize_targets standardizes them (and y_mean is kept)
    token_ids = False  # whether inputs are integer token ids (never scaled or normalized), not features
    bad_word = "NaN or Inf"
    num_classes: int | None = None

    def __str__(self) -> str:
        return self.name

    def header(self) -> dict:
        """Root attributes a dataset file of this task carries besides its name."""
        return {}

    def check_header(self) -> tuple[str, str] | None:
        """(problem, fix) when the task's own root attributes are missing or wrong, else None."""
        return None

    def output_shape(self, input_shape: tuple, output_dim: int) -> tuple:
        """The per-row shape of the model's output for inputs of input_shape."""
        return (output_dim,)

    def read_dtype(self, dtype) -> np.dtype:
        """The dtype targets are read in for a model computing in dtype."""
        return np.dtype(dtype)

    def stored_dtype(self) -> np.dtype:
        """The dtype `data convert` stores targets in."""
        return np.dtype(np.float32)

    def check_targets(self, y) -> tuple[str, str] | None:
        """(problem, fix) when a split's y has the wrong shape or dtype (metadata only), else None."""
        if y.ndim not in (1, 2) or y.dtype.kind != "f":
            return (f"shape {y.shape} dtype {y.dtype} is not (N,) or (N, k) floats",
                    f"store {self.name} targets as float32 or float64")
        return None

    def bad_targets(self, block: np.ndarray) -> np.ndarray:
        """Rows of a block of targets whose values the task cannot take."""
        return not_finite(block)

    def bad_message(self) -> tuple[str, str]:
        """(message with {value} and {row}, fix) for the first row bad_targets finds."""
        return "target {value} at row {row} is NaN or Inf", "clean the targets before writing the file"

    def output_dim(self, y) -> int:
        """The model's output width for targets y (an array or h5py dataset of shape (N,) or (N, k))."""
        return y.shape[1] if len(y.shape) == 2 else 1

    def convert_targets(self, y: np.ndarray) -> np.ndarray:
        """A block of input targets as stored (float32); BadTarget at the first value the task cannot take."""
        y = y.astype(np.float32)
        rows = np.flatnonzero(self.bad_targets(y))
        if rows.size:
            raise BadTarget(rows[0], f"target {y[rows[0]]} in row {{row}} is {self.bad_word}; HINT: clean it")
        return y

    def loss(self, label_smoothing: float = 0.0, class_weights=None):
        """The task's own loss; its options belong to classification only (TaskError naming {where}, the data)."""
        if label_smoothing or class_weights is not None:
            raise TaskError("loss.label_smoothing and loss.class_weights apply to classification, but {where} is "
                            f"a {self.name} dataset: remove them")
        return self.loss_class()

    def target_units(self, out: np.ndarray, norm) -> np.ndarray:
        """Model outputs in the units the targets are stored in (normalization undone where it applies)."""
        return out

    def outputs(self, logits: np.ndarray) -> dict:
        """{name: array} of a chunk's predictions, as `distbp predict` writes them."""
        out = logits.astype(np.float32)
        return {"output": out[:, 0] if out.shape[1] == 1 else out}

    predicted = "output"  # the outputs() entry Model.predict returns
    probability: str | None = None  # the outputs() entry Model.predict_proba returns, if any

    def scorers(self, k: int, norm, class_names):
        """Accumulators of the task's metrics beyond loss and accuracy (add_chunk, buf, metrics)."""
        return []

    def describe_targets(self, blocks) -> list[str]:
        """Lines summarising the targets' values, from (start, block) pairs."""
        ys = [np.asarray(block, dtype=np.float64) for _, block in blocks]
        return [f"y range [{min(b.min() for b in ys):.4g}, {max(b.max() for b in ys):.4g}]"]


class Regression(Task):
    """Float targets, mean squared error, RMSE/MAE/R^2 in the original units; targets may be standardized."""

    name = "regression"
    metrics = ("val_loss", "val_rmse", "val_mae", "val_r2", "val_baseline_rmse")
    loss_class = MSE
    normalizes_targets = True

    def target_units(self, out, norm):
        """Outputs with the target standardization undone."""
        return norm.y_original(out)

    def scorers(self, k, norm, class_names):
        """Squared and absolute errors against the train mean (RegressionSums)."""
        return [RegressionSums(k, norm.y_mean)]


class Binary(Task):
    """Independent probabilities in [0, 1] per output, binary cross-entropy on logits, accuracy at 0.5."""

    name = "binary"
    metrics = ("val_loss", "val_accuracy", "val_roc_auc")
    best = "val_accuracy"
    accuracy = True
    loss_class = BCEWithLogits
    bad_word = "not in [0, 1]"
    predicted, probability = "class", "probability"

    def bad_targets(self, block):
        """NaN, Inf or values outside [0, 1]."""
        return not_finite(block) | ((block < 0) | (block > 1)).reshape(len(block), -1).any(axis=1)

    def bad_message(self):
        return ("target {value} at row {row} is not in [0, 1]",
                "binary targets are probabilities in [0, 1]; clean them before writing the file")

    def scorers(self, k, norm, class_names):
        """The ROC-AUC of each output, averaged."""
        return [AucSums(k)]

    def outputs(self, logits):
        """The sigmoid probability and the class it gives at 0.5."""
        p = 1 / (1 + np.exp(-logits.astype(np.float64)))
        return {"probability": p.astype(np.float32), "class": (p > 0.5).astype(np.int64)}


class Classification(Task):
    """One class index in 0..K-1 per row, softmax cross-entropy, accuracy and a per-class report."""

    name = "classification"
    metrics = ("val_loss", "val_accuracy", "val_f1_macro")
    best = "val_accuracy"
    accuracy = labels = True
    predicted, probability = "class", "probabilities"

    def __init__(self, num_classes: int | None = None):
        self.num_classes = num_classes

    def header(self):
        return {"num_classes": self.num_classes}

    def read_dtype(self, dtype):
        return np.dtype(np.int64)

    def stored_dtype(self):
        return np.dtype(np.int64)

    def check_targets(self, y):
        if y.ndim != 1 or y.dtype.kind not in "iu":
            return (f"shape {y.shape} dtype {y.dtype} is not (N,) integer class labels",
                    "store class indices 0..num_classes-1 as int64 (the argmax of one-hot rows)")
        return None

    def bad_targets(self, block):
        """Labels outside [0, num_classes)."""
        return ((block < 0) | (block >= self.num_classes)).reshape(len(block), -1).any(axis=1)

    def bad_message(self):
        return (f"label {{value}} at row {{row}} is outside [0, {self.num_classes})",
                f"labels must be 0..{self.num_classes - 1}; fix them or the root attribute num_classes")

    def output_dim(self, y):
        return self.num_classes

    def convert_targets(self, y):
        """Class indices as int64: (N, 1) columns flattened, one-hot rows their argmax; BadTarget at the first
        value that is not an index."""
        if y.ndim == 2:
            y = y[:, 0] if y.shape[1] == 1 else y.argmax(axis=1)
        if y.ndim != 1:
            raise TaskError(f"labels of shape {y.shape[1:]} per row; HINT: classification needs one class index "
                            "per row (or one-hot rows), regression targets need --task regression")
        bad = np.flatnonzero((y < 0) | (y != np.round(y))) if y.dtype.kind == "f" else np.flatnonzero(y < 0)
        if bad.size:
            raise BadTarget(bad[0], f"label {y[bad[0]]} in row {{row}} is not a class index 0, 1, 2, ...; HINT: "
                                    "map the labels to 0..K-1, or pass --task regression")
        return y.astype(np.int64)

    def loss(self, label_smoothing=0.0, class_weights=None):
        """Softmax cross-entropy with label smoothing and class weights (one per class)."""
        if class_weights is not None and (len(class_weights) != self.num_classes or not any(class_weights)):
            raise TaskError(f"loss.class_weights has {len(class_weights)} weights (sum {sum(class_weights):g}) but "
                            f"{{where}} has {self.num_classes} classes: give one weight per class, not all 0")
        return SoftmaxCrossEntropy(label_smoothing=label_smoothing, class_weights=class_weights)

    def outputs(self, logits):
        """Softmax probabilities and the most probable class."""
        p = softmax(logits)
        return {"class": p.argmax(axis=1).astype(np.int64), "probabilities": p.astype(np.float32)}

    def scorers(self, k, norm, class_names):
        """The macro F1 score, and the per-class report when class names are asked for."""
        return [F1Sums(k)] + ([ConfusionSums(k, class_names)] if class_names else [])

    def class_names(self, stored: str | None) -> list[str]:
        """Names from a class_names attribute (a JSON list of num_classes), else '0'..'K-1'."""
        try:
            names = json.loads(stored or "null")
        except (TypeError, ValueError):
            names = None
        if isinstance(names, list) and len(names) == self.num_classes:
            return [str(n) for n in names]
        return [str(i) for i in range(self.num_classes)]

    def describe_targets(self, blocks):
        """Rows per class (one line when there are many classes)."""
        k = self.num_classes
        counts = np.zeros(k, np.int64)
        for _, block in blocks:
            counts += np.bincount(np.clip(block, 0, k - 1), minlength=k)
        if k > 20:  # one line, not a thousand
            lo, hi = int(counts.argmin()), int(counts.argmax())
            return [f"classes: {k}, rows per class {counts[lo]} (class {lo}) to "
                    f"{counts[hi]} (class {hi}), empty classes {int(np.sum(counts == 0))}"]
        share = ", ".join(f"{c}: {n} ({100 * n / max(counts.sum(), 1):.1f}%)" for c, n in enumerate(counts))
        return [f"classes {share}"]


class Sequence(Task):
    """Token ids (N, T) in, the next token of every place (N, T) out: cross-entropy per token, perplexity,
    per-token accuracy (`distbp data text`)."""

    name = "sequence"
    metrics = ("val_loss", "val_perplexity", "val_accuracy")
    accuracy = token_ids = True
    loss_class = SequenceCrossEntropy
    predicted = "token"

    def __init__(self, vocab_size: int | None = None):
        self.num_classes = vocab_size  # the output width, as a classifier's classes

    def header(self):
        return {"vocab_size": self.num_classes}

    def check_header(self):
        v = self.num_classes
        if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 31):
            return (f"root attribute vocab_size={v!r} must be a positive integer",
                    "make token datasets with `distbp data text`, which stores the vocabulary")
        return None

    def output_shape(self, input_shape, output_dim):
        """(T, V): logits of the next token at every place."""
        return (*input_shape, output_dim)

    def read_dtype(self, dtype):
        return np.dtype(np.int64)

    def stored_dtype(self):
        return np.dtype(np.int64)

    def check_targets(self, y):
        if y.ndim != 2 or y.dtype.kind not in "iu":
            return (f"shape {y.shape} dtype {y.dtype} is not (N, T) integer token ids",
                    "make token datasets with `distbp data text`")
        return None

    def output_dim(self, y):
        return self.num_classes

    def convert_targets(self, y):
        raise TaskError("token datasets are made from text; HINT: use `distbp data text FILE OUT --context T`")

    def outputs(self, logits):
        """The likeliest next token at every place."""
        return {"token": logits.argmax(axis=-1).astype(np.int64)}

    def scorers(self, k, norm, class_names):
        """exp of the mean token loss."""
        return [PerplexitySums()]


TASKS: dict[str, type[Task]] = {t.name: t for t in (Classification, Regression, Binary, Sequence)}


def task_named(name, num_classes: int | None = None, vocab_size: int | None = None) -> Task:
    """The task a file's task attribute names (num_classes for classification, vocab_size for sequences);
    TaskError if none."""
    if not isinstance(name, str) or name not in TASKS:
        raise TaskError(f"task={name!r} is not one of {', '.join(TASKS)}")
    if TASKS[name] is Sequence:
        return Sequence(vocab_size)
    return Classification(num_classes) if TASKS[name] is Classification else TASKS[name]()
