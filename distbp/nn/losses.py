"""Losses on the model output: forward returns the SUM over rows, backward d(sum)/d(out).

The per-row loss of MSE and BCEWithLogits is the mean over output columns, so dividing
the sum by the global row count gives PyTorch's ``reduction="mean"`` for all three. With
class weights the mean divides by the rows' summed weights instead (``total_weight``), as
torch's CrossEntropyLoss(weight=...) does.

The loss contract: a ``Loss`` subclass registered with ``@register_loss("name")``, built
without arguments, whose ``forward(out, y)`` returns the sum over the rows as a float and
keeps ``self.dout`` = d(sum)/d(out) (same shape and dtype as out) for ``backward()``;
``correct(out, y)`` counts right predictions (0 by default: no accuracy). ``loss.name``
in a config picks a registered name or ``module:ClassName``.
"""

import math

import numpy as np

from . import refs, threads

LOSS_TYPES: dict[str, type] = {}


def register_loss(name: str):
    """Class decorator adding a Loss class to LOSS_TYPES under ``name``."""
    return lambda cls: refs.add(LOSS_TYPES, name, cls, "loss")


def loss_class(name) -> type:
    """The loss class of a registered name or a `module:Name` reference (the module is imported)."""
    return refs.lookup(name, LOSS_TYPES, "loss", "distbp.nn.register_loss")


def _targets(out: np.ndarray, y, name: str) -> np.ndarray:
    """Float targets shaped like ``out``; (N,) targets are accepted for (N, 1) outputs."""
    y = np.asarray(y, dtype=out.dtype)
    if y.ndim == 1 and out.ndim == 2 and out.shape[1] == 1:
        y = y[:, None]
    if y.shape != out.shape:
        raise ValueError(f"{name}: targets of shape {y.shape} do not match outputs {out.shape}")
    return y


class Loss:
    """Shared parts: the cached gradient and the default correct count."""

    dout = None
    weighted = False  # whether rows weigh differently in the mean (total_weight needs the labels)

    def backward(self) -> np.ndarray:
        """Gradient of the last forward's loss sum w.r.t. out (same dtype as out)."""
        if self.dout is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        dout, self.dout = self.dout, None
        return dout

    def correct(self, out: np.ndarray, y) -> int:
        """Correct predictions; 0 for regression losses."""
        return 0

    def total_weight(self, y) -> float:
        """What the loss sum of rows y is divided by for the mean: the row count."""
        return float(len(y))


@register_loss("cross_entropy")
class SoftmaxCrossEntropy(Loss):
    """Softmax + cross-entropy on logits (fused, log-sum-exp stable), integer labels.

    As torch.nn.CrossEntropyLoss(weight=w, label_smoothing=eps): row i's loss is
    (1 - eps) w[y_i] (-log p_i[y_i]) + eps/C sum_c w[c] (-log p_i[c]), and the mean
    divides the sum by sum_i w[y_i] (``total_weight``).
    """

    def __init__(self, label_smoothing: float = 0.0, class_weights=None):
        if not 0 <= label_smoothing <= 1:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
        self.eps = float(label_smoothing)
        self.w = None if class_weights is None else np.asarray(class_weights, dtype=np.float64)
        if self.w is not None and (self.w.ndim != 1 or not np.isfinite(self.w).all() or (self.w < 0).any()):
            raise ValueError(f"class weights {class_weights!r} must be a list of finite numbers >= 0")

    @property
    def weighted(self) -> bool:
        """Class weights are set."""
        return self.w is not None

    def total_weight(self, y) -> float:
        """sum_i w[y_i] over rows y (the row count without class weights)."""
        return float(len(y)) if self.w is None else float(self.w[np.asarray(y)].sum())

    def forward(self, out: np.ndarray, y) -> float:
        """Sum over rows of the (weighted, smoothed) cross-entropy; plain: logsumexp(out_i) - out_i[y_i]."""
        n, c = out.shape                               # (N, C)
        y = np.asarray(y)
        if y.shape != (n,) or y.dtype.kind not in "iu":
            raise ValueError(f"cross-entropy needs integer labels of shape ({n},), "
                             f"got {y.dtype} {y.shape}")
        # one pass for both bounds: as unsigned, a negative label is larger than any valid one
        if n and (y.view(np.uint64) if y.dtype.itemsize == 8 else y.astype(np.uint64)).max() >= c:
            raise ValueError(f"labels must be in [0, {c}), got range [{y.min()}, {y.max()}]")
        if self.w is not None and len(self.w) != c:
            raise ValueError(f"{len(self.w)} class weights for {c} classes")
        if self.eps or self.w is not None:
            return self._smoothed_weighted(out, y)
        z, row_loss = np.empty_like(out), np.empty(n, out.dtype)  # (N, C), (N,)
        rows = max(1, threads.BLOCK // c)  # rows are independent: blocks of them on the rank's threads

        def blocks(lo, hi):
            for a in range(lo * rows, min(hi * rows, n), rows):
                _softmax_rows(out[a : a + rows], y[a : a + rows], z[a : a + rows], row_loss[a : a + rows])

        threads.run(blocks, -(-n // rows), out.size)
        self.dout = z                                  # p - onehot(y)
        return float(row_loss.sum(dtype=np.float64))

    def _smoothed_weighted(self, out: np.ndarray, y: np.ndarray) -> float:
        """The general row loss and its gradient p (a w_y + b W) - a w_y onehot(y) - b w, a = 1-eps, b = eps/C."""
        n, c = out.shape
        w = np.ones(c, out.dtype) if self.w is None else self.w.astype(out.dtype)  # (C,)
        a, b = 1 - self.eps, self.eps / c
        z = out - out.max(axis=1, keepdims=True)       # (N, C)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # (N, C) log-softmax
        rows = np.arange(n)
        w_y = w[y]                                     # (N,)
        row_loss = -(a * w_y * log_p[rows, y] + b * (log_p @ w))
        p = np.exp(log_p, out=log_p)                   # (N, C) softmax
        p *= (a * w_y + b * w.sum())[:, None]
        p[rows, y] -= a * w_y
        p -= b * w
        self.dout = p
        return float(row_loss.sum(dtype=np.float64))

    def correct(self, out: np.ndarray, y) -> int:
        """Rows whose argmax equals the label."""
        return int(np.count_nonzero(out.argmax(axis=1) == np.asarray(y)))


def _softmax_rows(out, y, z, row_loss):
    """Into z: softmax(out) - onehot(y); into row_loss: logsumexp(out_i) - out_i[y_i], for a block of rows."""
    n, c = out.shape
    np.subtract(out, out.max(axis=1, keepdims=True), out=z)  # row max 0
    flat_y = np.arange(0, n * c, c) + y            # (n,) flat positions of z[i, y_i]: cheaper than 2-D fancy indexing
    z_flat = z.reshape(-1)
    z_y = z_flat[flat_y]                           # (n,)
    np.exp(z, out=z)
    total = z.sum(axis=1, keepdims=True)           # (n, 1), >= 1
    np.log(total[:, 0], out=row_loss)
    row_loss -= z_y
    z /= total                                     # softmax p
    z_flat[flat_y] -= 1


@register_loss("mse")
class MSE(Loss):
    """Squared error; per-row loss is the mean over output columns."""

    def forward(self, out: np.ndarray, y) -> float:
        """Sum over rows of mean_j (out_ij - y_ij)^2."""
        d = out - _targets(out, y, "mse")              # (N, D)
        width = math.prod(d.shape[1:])
        loss = float(np.vdot(d, d)) / width
        d *= 2.0 / width
        self.dout = d
        return loss


@register_loss("bce")
class BCEWithLogits(Loss):
    """Binary cross-entropy on logits, stable form max(x,0) - x y + log(1 + exp(-|x|))."""

    def forward(self, out: np.ndarray, y) -> float:
        """Sum over rows of the mean over columns of the element loss."""
        y = _targets(out, y, "bce")                    # (N, D) in [0, 1]
        width = math.prod(out.shape[1:])
        loss, self.dout = np.empty_like(out), np.empty_like(out)

        def bce(loss, dout, out, y):
            e = np.exp(-np.abs(out))
            np.add(np.maximum(out, 0) - out * y, np.log1p(e), out=loss)
            p = np.where(out >= 0, 1.0, e) / (1.0 + e)  # sigmoid(out) without overflow
            np.copyto(dout, (p - y) / width, casting="same_kind")

        threads.elementwise(bce, loss, self.dout, np.ascontiguousarray(out), np.ascontiguousarray(y))
        return float(loss.sum(dtype=np.float64)) / width

    def correct(self, out: np.ndarray, y) -> int:
        """Rows whose every column has the right side of 0 (label > 0.5)."""
        y = _targets(out, y, "bce")
        right = (out > 0) == (y > 0.5)
        return int(np.count_nonzero(right.all(axis=tuple(range(1, right.ndim)))))


def balanced_weights(counts) -> np.ndarray:
    """n / (C * count_c) per class from the label counts, as scikit-learn's class_weight="balanced"."""
    counts = np.asarray(counts, dtype=np.int64)
    if (counts == 0).any():
        raise ValueError(f"class {int(np.argmax(counts == 0))} has no rows, so it has no balanced weight")
    return counts.sum() / (len(counts) * counts.astype(np.float64))


LOSSES = {"classification": SoftmaxCrossEntropy, "regression": MSE, "binary": BCEWithLogits}


def make_loss(task: str, **kwargs) -> Loss:
    """Loss for a task: classification, regression or binary."""
    if task not in LOSSES:
        raise ValueError(f"unknown task {task!r}; use one of {sorted(LOSSES)}")
    return LOSSES[task](**kwargs)
