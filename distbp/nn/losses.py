"""Losses on the model output: forward returns the SUM over rows, backward d(sum)/d(out).

The per-row loss of MSE and BCEWithLogits is the mean over output columns, so dividing
the sum by the global row count gives PyTorch's ``reduction="mean"`` for all three.

The loss contract: a ``Loss`` subclass registered with ``@register_loss("name")``, built
without arguments, whose ``forward(out, y)`` returns the sum over the rows as a float and
keeps ``self.dout`` = d(sum)/d(out) (same shape and dtype as out) for ``backward()``;
``correct(out, y)`` counts right predictions (0 by default: no accuracy). ``loss.name``
in a config picks a registered name or ``module:ClassName``.
"""

import math

import numpy as np

from . import refs

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

    def backward(self) -> np.ndarray:
        """Gradient of the last forward's loss sum w.r.t. out (same dtype as out)."""
        if self.dout is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        dout, self.dout = self.dout, None
        return dout

    def correct(self, out: np.ndarray, y) -> int:
        """Correct predictions; 0 for regression losses."""
        return 0


@register_loss("cross_entropy")
class SoftmaxCrossEntropy(Loss):
    """Softmax + cross-entropy on logits (fused, log-sum-exp stable), integer labels."""

    def forward(self, out: np.ndarray, y) -> float:
        """Sum over rows of logsumexp(out_i) - out_i[y_i]."""
        n, c = out.shape                               # (N, C)
        y = np.asarray(y)
        if y.shape != (n,) or y.dtype.kind not in "iu":
            raise ValueError(f"cross-entropy needs integer labels of shape ({n},), "
                             f"got {y.dtype} {y.shape}")
        # one pass for both bounds: as unsigned, a negative label is larger than any valid one
        if n and (y.view(np.uint64) if y.dtype.itemsize == 8 else y.astype(np.uint64)).max() >= c:
            raise ValueError(f"labels must be in [0, {c}), got range [{y.min()}, {y.max()}]")
        z = out - out.max(axis=1, keepdims=True)       # (N, C), row max 0
        flat_y = np.arange(0, n * c, c) + y            # (N,) flat positions of z[i, y_i]: cheaper than 2-D fancy indexing
        z_flat = z.reshape(-1)
        z_y = z_flat[flat_y]                           # (N,)
        np.exp(z, out=z)
        total = z.sum(axis=1, keepdims=True)           # (N, 1), >= 1
        row_loss = np.log(total[:, 0])
        row_loss -= z_y
        loss = row_loss.sum(dtype=np.float64)
        z /= total                                     # softmax p
        z_flat[flat_y] -= 1
        self.dout = z                                  # p - onehot(y)
        return float(loss)

    def correct(self, out: np.ndarray, y) -> int:
        """Rows whose argmax equals the label."""
        return int(np.count_nonzero(out.argmax(axis=1) == np.asarray(y)))


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
        e = np.exp(-np.abs(out))                       # (N, D)
        loss = np.maximum(out, 0) - out * y + np.log1p(e)
        p = np.where(out >= 0, 1.0, e) / (1.0 + e)     # sigmoid(out) without overflow
        self.dout = ((p - y) / width).astype(out.dtype, copy=False)
        return float(loss.sum(dtype=np.float64)) / width

    def correct(self, out: np.ndarray, y) -> int:
        """Rows whose every column has the right side of 0 (label > 0.5)."""
        y = _targets(out, y, "bce")
        right = (out > 0) == (y > 0.5)
        return int(np.count_nonzero(right.all(axis=tuple(range(1, right.ndim)))))


LOSSES = {"classification": SoftmaxCrossEntropy, "regression": MSE, "binary": BCEWithLogits}


def make_loss(task: str, name: str = "") -> Loss:
    """The loss called name (loss.name), or the task's own: classification, regression or binary."""
    if name:
        return loss_class(name)()
    if task not in LOSSES:
        raise ValueError(f"unknown task {task!r}; use one of {sorted(LOSSES)}")
    return LOSSES[task]()
