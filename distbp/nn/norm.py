"""Normalization layers: BatchNorm with statistics synchronized across ranks, LayerNorm."""

import numpy as np

from . import kernels, threads
from .layers import Layer, check_spec, register, spec_value


def _allreduce(ctx, buf):
    """Sum buf over the ranks in place when ctx has a multi-rank comm; return it."""
    comm = getattr(ctx, "comm", None)
    if comm is not None and comm.size > 1:
        comm.allreduce_sum(buf)
    return buf


def _eps(spec: dict, index: int) -> float:
    """Read spec["eps"] (default 1e-5, as torch) as a positive float."""
    return spec_value(spec, index, "eps", float, 1e-5, lambda v: v > 0, "> 0, e.g. eps = 1e-5")


@register("batchnorm")
class BatchNorm(Layer):
    """Batch normalization over axis 1 of (N, C) or (N, C, H, W), statistics over the GLOBAL batch.

    Train mode: the mean per channel comes from an allreduce of the local (sum x, count),
    then the biased variance from a second one of the local sum (x - mean)^2 (two passes:
    E[x^2] - E[x]^2 loses all precision when the mean is large against the spread), so n
    ranks normalize like 1 rank on the whole batch (torch SyncBatchNorm). Backward allreduces (sum dy, sum dy*xhat) and
    returns the gradient of the global loss sum; dW and db stay local sums, which the
    trainer's gradient allreduce adds up. Running stats use the unbiased variance.
    """

    private_output = True
    private_dx = True
    need_dx = True
    relu = False  # set by Chain.link when a ReLU follows: the affine pass rectifies each channel row in cache
    masks_dy = True  # ... and backward masks each row of dy in its first pass (the ReLU passes dy on)

    def __init__(self, in_shape, eps, momentum):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(in_shape)
        self.C = in_shape[0]
        self.eps, self.momentum = eps, momentum

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "batchnorm"[, "eps": 1e-5, "momentum": 0.1]} on a (C,) or (C, H, W) input."""
        check_spec(spec, index, ("eps", "momentum"))
        if len(in_shape) not in (1, 3):
            raise ValueError(f"layer {index} (batchnorm) needs a (C,) or (C, H, W) input but gets shape "
                             f"{tuple(in_shape)}")
        momentum = spec_value(spec, index, "momentum", float, 0.1, lambda v: 0 <= v <= 1, "in [0, 1], e.g. 0.1")
        return cls(in_shape, _eps(spec, index), momentum)

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """W (gamma) and b (beta), one per channel."""
        return [("W", (self.C,)), ("b", (self.C,))]

    def buffer_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Running mean and (unbiased) variance per channel."""
        return [("running_mean", (self.C,)), ("running_var", (self.C,))]

    def bind(self, params: dict, grads: dict) -> None:
        """Keep views of gamma, beta and their gradients."""
        self.W, self.dW, self.b, self.db = params["W"], grads["W"], params["b"], grads["b"]

    def bind_buffers(self, views: dict) -> None:
        """Keep views of the running statistics."""
        self.running_mean, self.running_var = views["running_mean"], views["running_var"]

    def init_params(self, rng: np.random.Generator) -> None:
        """gamma = 1, beta = 0."""
        self.W[...], self.b[...] = 1, 0

    def init_buffers(self) -> None:
        """running_mean = 0, running_var = 1."""
        self.running_mean[...], self.running_var[...] = 0, 1

    def forward(self, x):
        """y = gamma * (x - mean) / sqrt(var + eps) + beta; batch stats in train, running in eval."""
        self.perm = _channels_first(x)
        x2 = _channel_rows(x, self.perm)
        if self.training:
            mean, var, self.centered = self._batch_stats(x2)
            self._update_running(mean, var, self.M)
        else:
            mean, var = self.running_mean.astype(np.float64), self.running_var.astype(np.float64)
            self.centered, shift = np.empty_like(x2), mean.astype(x.dtype)
            _by_rows(lambda c: np.subtract(x2[c], shift[c], out=self.centered[c]), x2)
        # kept for backward: x - shift (the mean rounded to x's dtype), the rounding d = mean - shift, 1 / std
        self.d, self.inv_std = mean - mean.astype(x.dtype), 1 / np.sqrt(var + self.eps)
        scale = self.W * self.inv_std  # y = (x - shift) * scale + (beta - d * scale)
        a, b, y2 = scale.astype(x.dtype), (self.b - self.d * scale).astype(x.dtype), np.empty_like(x2)
        # one compiled pass: (x - shift) * a + b, and the fused ReLU's max(., 0) (kernels.py)
        threads.run(lambda lo, hi: kernels.scale_shift(self.centered, a, b, self.relu, y2, lo, hi), self.C, x2.size)
        self.y2 = y2 if self.relu else None  # the ReLU's output: backward's mask
        return _from_rows(y2, x.shape, self.perm)

    def fuses_relu(self) -> bool:
        """Whether a following ReLU can run inside forward's affine pass (always)."""
        return True

    def _batch_stats(self, x2):
        """Global mean and biased variance per channel in two passes: var = mean((x - mean)^2), each row
        summed pairwise, the rows' sums and the ranks' in float64; also x - shift (kept for backward).

        x is centered on the mean rounded to x.dtype (a float64 copy of a float32 x costs several times
        more), and var corrects for that rounding d exactly: mean((x - mean + d)^2) = var + d^2.
        """
        sums = np.empty(self.C + 1)  # [sum x (C), count]
        _by_rows(lambda c: sums.__setitem__(c, x2[c].sum()), x2)
        sums[-1] = x2.shape[1]
        self.M = M = _allreduce(self.ctx, sums)[-1]  # rows * spatial over all ranks
        mean = sums[: self.C] / max(M, 1)
        shift = mean.astype(x2.dtype)
        centered, squares = np.empty_like(x2), np.empty(self.C)  # x - shift; sum (x - shift)^2, (C,)

        def center(c):
            np.subtract(x2[c], shift[c], out=centered[c])
            squares[c] = np.square(centered[c]).sum()

        _by_rows(center, x2)
        d = mean - shift
        return mean, np.maximum(_allreduce(self.ctx, squares) / max(M, 1) - d * d, 0), centered

    def _update_running(self, mean, var, M):
        """Exponential moving averages, unbiased variance like torch."""
        if M < 1:
            return
        m = self.momentum
        unbiased = var * (M / (M - 1)) if M > 1 else var
        self.running_mean[...] = (1 - m) * self.running_mean + m * mean
        self.running_var[...] = (1 - m) * self.running_var + m * unbiased

    def backward(self, dy):
        """Add local dW, db; return dx of the global sum loss (global sums of dy, dy*xhat), or None."""
        C, src = self.C, _channel_rows(dy, self.perm)
        copied = not dy.transpose(self.perm).flags.c_contiguous  # then src is a fresh copy, free to overwrite
        dy2 = src if not self.relu or copied or self.overwrite_dy else np.empty_like(src)  # dy, masked if fused
        sums = np.empty(2 * C)  # [sum dy (C), sum dy*xhat (C)] in float64

        def row_sums(lo, hi):
            if self.relu:  # the fused ReLU's dy * (y > 0), compiled (kernels.py)
                kernels.relu_mask(src, self.y2, dy2, lo, hi)
            for c in range(lo, hi):  # NumPy's pairwise sums, the rows still in cache
                sums[c], sums[C + c] = dy2[c].sum(), np.multiply(dy2[c], self.centered[c]).sum()

        threads.run(row_sums, C, dy2.size)
        # x - mean = (x - shift) - d, so sum dy*xhat = (sum dy*(x - shift) - d sum dy) / std
        sums[C:] = (sums[C:] - self.d * sums[:C]) * self.inv_std
        self.db += sums[: self.C].astype(self.db.dtype)  # local sums: the trainer's allreduce adds ranks
        self.dW += sums[self.C :].astype(self.dW.dtype)
        if not self.need_dx:  # the same on every rank, so every rank skips the allreduce
            return None
        g = self.W * self.inv_std  # gamma / sqrt(var + eps)
        dx2, gx = np.empty_like(dy2), g.astype(dy.dtype)
        if not self.training:  # running stats are constants
            _by_rows(lambda c: np.multiply(dy2[c], gx[c], out=dx2[c]), dy2)
            return _from_rows(dx2, dy.shape, self.perm)
        mean_dy, mean_dyxhat = np.split(_allreduce(self.ctx, sums) / max(self.M, 1), 2)  # global means
        # dx = g * (dy - mean(dy) - xhat * mean(dy * xhat)) = g dy + k (x - shift) + c per channel
        k = -g * mean_dyxhat * self.inv_std
        kx, cx = k.astype(dy.dtype), (-g * mean_dy - k * self.d).astype(dy.dtype)

        threads.run(lambda lo, hi: kernels.scale_add(dy2, gx, self.centered, kx, cx, dx2, lo, hi), C, dy2.size)
        return _from_rows(dx2, dy.shape, self.perm)


def _channels_first(x) -> tuple:
    """The axis order (channel first) BatchNorm works in: x's own memory order when that already has the
    channel outermost, as a conv's output (C, H, W, N) does, else (C, N, ...)."""
    if x.ndim == 4 and x.transpose(1, 2, 3, 0).flags.c_contiguous:
        return (1, 2, 3, 0)
    return (1, 0) + tuple(range(2, x.ndim))


def _channel_rows(a, perm):
    """a in axis order perm as a C-contiguous (C, M) array: a view when that is a's memory order, else a copy."""
    t = np.ascontiguousarray(a.transpose(perm))
    return t.reshape(t.shape[0], -1)


def _from_rows(a2, shape, perm):
    """The inverse of _channel_rows: a (C, M) array as a view of the given shape."""
    return a2.reshape([shape[p] for p in perm]).transpose(np.argsort(perm))


def _by_rows(fn, a2):
    """fn(c) for every channel row c of a (C, M) array, on the rank's threads: a row's arithmetic
    (numpy sums a contiguous row pairwise: error ~ log2(M) ulps) is the same on any of them."""
    threads.run(lambda lo, hi: [fn(c) for c in range(lo, hi)], a2.shape[0], a2.size)


@register("layernorm")
class LayerNorm(Layer):
    """Layer normalization per sample over the last `dims` axes, elementwise affine (torch LayerNorm)."""

    private_output = True
    private_dx = True
    need_dx = True

    def __init__(self, in_shape, dims, eps):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(in_shape)
        self.norm_shape = self.in_shape[len(in_shape) - dims :]
        self.axes = tuple(range(-dims, 0))
        self.eps = eps

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "layernorm"[, "dims": all feature axes (the last for (T, D)), "eps": 1e-5]}."""
        check_spec(spec, index, ("dims", "eps"))
        # over a sequence's (T, D) only the last axis: normalizing over T would mix later places into earlier ones
        default = 1 if len(in_shape) == 2 else len(in_shape)
        dims = spec_value(spec, index, "dims", int, default, lambda v: 1 <= v <= len(in_shape),
                          f"in 1..{len(in_shape)}, the number of trailing axes of the input "
                          f"{tuple(in_shape)} to normalize over")
        return cls(in_shape, dims, _eps(spec, index))

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """W (gamma) and b (beta), shaped like the normalized axes."""
        return [("W", self.norm_shape), ("b", self.norm_shape)]

    def bind(self, params: dict, grads: dict) -> None:
        """Keep views of gamma, beta and their gradients."""
        self.W, self.dW, self.b, self.db = params["W"], grads["W"], params["b"], grads["b"]

    def init_params(self, rng: np.random.Generator) -> None:
        """gamma = 1, beta = 0."""
        self.W[...], self.b[...] = 1, 0

    def forward(self, x):
        """y = gamma * (x - mean) / sqrt(var + eps) + beta, stats per sample."""
        xc = x - x.mean(axis=self.axes, keepdims=True)
        var = np.square(xc).mean(axis=self.axes, keepdims=True)  # (N, ..., 1)
        self.inv_std = 1 / np.sqrt(var + self.eps)
        self.xhat = xc * self.inv_std
        return self.W * self.xhat + self.b

    def backward(self, dy):
        """Add dW, db; return dx (None if need_dx is off)."""
        lead = tuple(range(dy.ndim - len(self.axes)))  # batch and any unnormalized axes
        self.dW += (dy * self.xhat).sum(axis=lead)
        self.db += dy.sum(axis=lead)
        if not self.need_dx:
            return None
        g = dy * self.W  # dL/dxhat
        return self.inv_std * (g - g.mean(axis=self.axes, keepdims=True)
                               - self.xhat * (g * self.xhat).mean(axis=self.axes, keepdims=True))

