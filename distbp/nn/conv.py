"""Convolutional layers on NCHW arrays: Conv2D (im2col + BLAS), MaxPool2D, Flatten."""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .init import INITS
from .layers import Layer, check_spec, register


def _pair(spec: dict, index: int, key: str, default=None, low: int = 1) -> tuple[int, int]:
    """Read spec[key] as an int or an [h, w] pair of ints >= low."""
    value = spec.get(key, default)
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, list | tuple) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in pair):
        raise ValueError(f"layer {index} ({spec['type']}): {key}={value!r} must be an int >= {low} "
                         f"or a pair [h, w] of them, e.g. {key} = {max(low, 2)}")
    return pair


def _out_hw(spec: dict, index: int, in_shape: tuple, kernel, stride, padding=(0, 0)) -> tuple[int, int]:
    """Output (Ho, Wo) of (kh, kw) windows sliding with stride over the padded (H, W)."""
    if len(in_shape) != 3:
        raise ValueError(f"layer {index} ({spec['type']}) needs a (C, H, W) input but gets shape "
                         f"{tuple(in_shape)}; use it before any flatten or linear layer")
    out = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(in_shape[1:], kernel, stride, padding))
    if min(out) < 1:
        raise ValueError(f"layer {index} ({spec['type']}): kernel {list(kernel)} does not fit the "
                         f"input {tuple(in_shape)} with padding {list(padding)}; use a smaller kernel or more padding")
    return out


def _windows(x, kh, kw, sh, sw, Ho, Wo):
    """Strided view of every (kh, kw) window: (N, C, H, W) -> (N, C, Ho, Wo, kh, kw)."""
    return sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, : sh * Ho : sh, : sw * Wo : sw]


def _col2im(dwin, shape, sh, sw):
    """Sum window gradients (N, C, kh, kw, Ho, Wo) back onto an input of shape (N, C, H, W)."""
    N, C, kh, kw, Ho, Wo = dwin.shape
    dx = np.zeros(shape, dtype=dwin.dtype)
    for i in range(kh):
        for j in range(kw):
            dx[:, :, i : i + sh * Ho : sh, j : j + sw * Wo : sw] += dwin[:, :, i, j]
    return dx


@register("conv2d")
class Conv2D(Layer):
    """2-D convolution (cross-correlation, as torch) of (N, C, H, W) with W (F, C, kh, kw) plus b (F,)."""

    private_output = True
    private_dx = True
    need_dx = True

    def __init__(self, in_shape, out_channels, kernel, stride, padding, bias, init, out_hw):
        self.in_shape, self.C, self.F = tuple(in_shape), in_shape[0], out_channels
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = kernel, stride, padding
        self.bias, self.init = bias, init
        self.Ho, self.Wo = out_hw
        self.out_shape = (out_channels, self.Ho, self.Wo)

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "conv2d", "out_channels": 16, "kernel": 3[, "stride": 1, "padding": 0,
        "bias": true, "init": "he_normal"]}; kernel, stride and padding take an int or [h, w]."""
        check_spec(spec, index, ("out_channels", "kernel", "stride", "padding", "bias", "init"))
        F = spec.get("out_channels")
        if not isinstance(F, int) or isinstance(F, bool) or F < 1:
            raise ValueError(f"layer {index} (conv2d) needs a positive int 'out_channels', got {F!r}")
        init = spec.get("init")
        if init is not None and init not in INITS:
            raise ValueError(f"layer {index} (conv2d): init={init!r} is unknown; use one of {sorted(INITS)}")
        kernel, stride = _pair(spec, index, "kernel"), _pair(spec, index, "stride", 1)
        padding = _pair(spec, index, "padding", 0, low=0)
        out_hw = _out_hw(spec, index, in_shape, kernel, stride, padding)
        return cls(in_shape, F, kernel, stride, padding, bool(spec.get("bias", True)), init, out_hw)

    def param_shapes(self) -> list:
        """[("W", (F, C, kh, kw)), ("b", (F,))], without b when bias is off."""
        shapes = [("W", (self.F, self.C, self.kh, self.kw))]
        return shapes + [("b", (self.F,))] if self.bias else shapes

    def bind(self, params: dict, grads: dict) -> None:
        """Keep the views of W, b and their gradients."""
        self.W, self.dW = params["W"], grads["W"]
        self.b, self.db = params.get("b"), grads.get("b")

    def init_params(self, rng: np.random.Generator) -> None:
        """Fill W with the chosen scheme (fans as torch: C*kh*kw, F*kh*kw; He normal if unset), b with zeros."""
        area = self.kh * self.kw
        self.W[...] = INITS[self.init or "he_normal"](rng, self.C * area, self.F * area, self.W.shape)
        if self.b is not None:
            self.b[...] = 0

    def forward(self, x):
        """y = W * x + b on every window, as one batched BLAS matmul over the im2col matrix."""
        N = x.shape[0]
        if self.ph or self.pw:
            x = np.pad(x, ((0, 0), (0, 0), (self.ph, self.ph), (self.pw, self.pw)))  # (N, C, Hp, Wp)
        win = _windows(x, self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)  # (N, C, Ho, Wo, kh, kw) view
        K = self.C * self.kh * self.kw
        self.cols = win.transpose(0, 1, 4, 5, 2, 3).reshape(N, K, self.Ho * self.Wo)  # im2col copy
        self.xp_shape = x.shape
        y = np.matmul(self.W.reshape(self.F, K), self.cols)  # (N, F, Ho*Wo)
        if self.b is not None:
            y += self.b[:, None]
        return y.reshape(N, *self.out_shape)

    def backward(self, dy):
        """dW += dy cols^T, db += sum(dy), return dx = col2im(W^T dy) (None if need_dx is off)."""
        N = dy.shape[0]
        dy = dy.reshape(N, self.F, self.Ho * self.Wo)
        self.dW += np.matmul(dy, self.cols.transpose(0, 2, 1)).sum(axis=0).reshape(self.W.shape)
        if self.b is not None:
            self.db += dy.sum(axis=(0, 2))
        if not self.need_dx:
            return None
        dcols = np.matmul(self.W.reshape(self.F, -1).T, dy)  # (N, C*kh*kw, Ho*Wo)
        dcols = dcols.reshape(N, self.C, self.kh, self.kw, self.Ho, self.Wo)
        dx = _col2im(dcols, self.xp_shape, self.sh, self.sw)  # (N, C, Hp, Wp)
        H, W = self.in_shape[1:]
        return dx[:, :, self.ph : self.ph + H, self.pw : self.pw + W]


@register("maxpool2d")
class MaxPool2D(Layer):
    """Max over (kh, kw) windows (no padding, floor as torch); backward routes dy to each window's argmax."""

    private_output = True
    private_dx = True

    def __init__(self, in_shape, kernel, stride, out_hw):
        self.in_shape = tuple(in_shape)
        (self.kh, self.kw), (self.sh, self.sw) = kernel, stride
        self.Ho, self.Wo = out_hw
        self.out_shape = (in_shape[0], self.Ho, self.Wo)

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "maxpool2d", "kernel": 2[, "stride": kernel]}, int or [h, w] each."""
        check_spec(spec, index, ("kernel", "stride"))
        kernel = _pair(spec, index, "kernel")
        stride = _pair(spec, index, "stride", list(kernel))
        return cls(in_shape, kernel, stride, _out_hw(spec, index, in_shape, kernel, stride))

    def forward(self, x):
        """y = max of each window; keeps the argmax within each window."""
        N, C = x.shape[:2]
        win = _windows(x, self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)
        win = win.reshape(N, C, self.Ho, self.Wo, self.kh * self.kw)  # copy: (N, C, Ho, Wo, kh*kw)
        self.argmax = win.argmax(axis=-1)[..., None]  # (N, C, Ho, Wo, 1)
        self.x_shape = x.shape
        return np.take_along_axis(win, self.argmax, axis=-1)[..., 0]

    def backward(self, dy):
        """dx = dy placed at each window's argmax (summed where windows overlap)."""
        N, C = dy.shape[:2]
        dwin = np.zeros((N, C, self.Ho, self.Wo, self.kh * self.kw), dtype=dy.dtype)
        np.put_along_axis(dwin, self.argmax, dy[..., None], axis=-1)
        dwin = dwin.reshape(N, C, self.Ho, self.Wo, self.kh, self.kw).transpose(0, 1, 4, 5, 2, 3)
        return _col2im(dwin, self.x_shape, self.sh, self.sw)  # (N, C, H, W)


@register("flatten")
class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W) in C order, as torch.nn.Flatten."""

    def __init__(self, in_shape):
        self.in_shape = tuple(in_shape)
        self.out_shape = (int(np.prod(in_shape)),)

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "flatten"}."""
        check_spec(spec, index)
        return cls(in_shape)

    def forward(self, x):
        """Reshape to (N, features)."""
        return x.reshape(x.shape[0], *self.out_shape)

    def backward(self, dy):
        """Reshape back to (N, *in_shape)."""
        return dy.reshape(dy.shape[0], *self.in_shape)
