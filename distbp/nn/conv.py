"""Convolutional layers on NCHW arrays: Conv2D (im2col + BLAS), MaxPool2D, Flatten."""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from distbp.nn import init
from distbp.nn.layers import register


def _pair(spec: dict, key: str, default=None) -> tuple[int, int]:
    """Read spec[key] as an int or a [h, w] pair of ints."""
    value = spec.get(key, default)
    pair = (value, value) if isinstance(value, int) else tuple(value or ())
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{spec.get('type')} {key}={value!r} must be an int or [h, w] ints, e.g. {key} = 3")
    return pair


def _out_size(size: int, k: int, stride: int, pad: int, spec: dict) -> int:
    """Output length of a window of k sliding with stride over size + 2*pad."""
    out = (size + 2 * pad - k) // stride + 1
    if out < 1 or stride < 1 or pad < 0:
        raise ValueError(f"{spec.get('type')} kernel {k}, stride {stride}, padding {pad} do not fit "
                         f"an input of size {size}; use a smaller kernel or more padding")
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
class Conv2D:
    """2-D convolution (cross-correlation as in torch) on (N, C, H, W) with W (F, C, kh, kw)."""

    kind = "conv2d"

    def __init__(self, in_shape, out_channels, kernel, stride, padding, bias, index, seed):
        C, H, Wd = in_shape
        self.in_shape, self.index, self.seed = tuple(in_shape), index, seed
        self.C, self.F, self.bias = C, out_channels, bias
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = kernel, stride, padding
        spec = {"type": "conv2d"}
        self.Ho = _out_size(H, self.kh, self.sh, self.ph, spec)
        self.Wo = _out_size(Wd, self.kw, self.sw, self.pw, spec)
        self.out_shape = (out_channels, self.Ho, self.Wo)
        self.training = True

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int) -> "Conv2D":
        """Conv2D from {"type": "conv2d", "out_channels": F, "kernel": k, "stride": 1, "padding": 0}."""
        if len(in_shape) != 3:
            raise ValueError(f"conv2d needs a (C, H, W) input, got {in_shape}; "
                             "give the dataset image shape or put conv layers before flatten")
        F = spec.get("out_channels")
        if not isinstance(F, int) or F < 1:
            raise ValueError(f"conv2d out_channels={F!r} must be a positive int, e.g. out_channels = 16")
        return cls(in_shape, F, _pair(spec, "kernel"), _pair(spec, "stride", 1),
                   _pair(spec, "padding", 0), bool(spec.get("bias", True)), index, seed)

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """W (F, C, kh, kw) and, unless bias = false, b (F,)."""
        shapes = [("W", (self.F, self.C, self.kh, self.kw))]
        return shapes + [("b", (self.F,))] if self.bias else shapes

    def bind(self, params: dict, grads: dict) -> None:
        """Keep views of this layer's parameters and gradients."""
        self.W, self.dW = params["W"], grads["W"]
        self.b, self.db = (params["b"], grads["b"]) if self.bias else (None, None)

    def init_params(self, rng: np.random.Generator) -> None:
        """He-normal W (fan_in = C*kh*kw, as torch), zero b."""
        ksize = self.kh * self.kw
        self.W[...] = init.he_normal(rng, self.C * ksize, self.F * ksize, self.W.shape)
        if self.bias:
            self.b[...] = 0

    def forward(self, x):
        """y = W * x + b over every window; caches the im2col matrix for backward."""
        N = x.shape[0]
        xp = np.pad(x, ((0, 0), (0, 0), (self.ph, self.ph), (self.pw, self.pw))) if self.ph or self.pw else x
        win = _windows(xp, self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)  # (N, C, Ho, Wo, kh, kw)
        self.cols = win.transpose(0, 1, 4, 5, 2, 3).reshape(N, -1, self.Ho * self.Wo)  # (N, C*kh*kw, Ho*Wo)
        self.xp_shape = xp.shape
        y = np.matmul(self.W.reshape(self.F, -1), self.cols)  # (N, F, Ho*Wo)
        if self.bias:
            y += self.b[:, None]
        return y.reshape(N, *self.out_shape)

    def backward(self, dy):
        """Add dW, db; return dx by col2im of W^T dy."""
        N = dy.shape[0]
        dy = dy.reshape(N, self.F, -1)  # (N, F, Ho*Wo)
        Wm = self.W.reshape(self.F, -1)  # (F, C*kh*kw)
        self.dW += np.matmul(dy, self.cols.transpose(0, 2, 1)).sum(axis=0).reshape(self.W.shape)
        if self.bias:
            self.db += dy.sum(axis=(0, 2))
        dcols = np.matmul(Wm.T, dy).reshape(N, self.C, self.kh, self.kw, self.Ho, self.Wo)
        dxp = _col2im(dcols, self.xp_shape, self.sh, self.sw)  # (N, C, H + 2ph, W + 2pw)
        H, Wd = self.in_shape[1:]
        return dxp[:, :, self.ph : self.ph + H, self.pw : self.pw + Wd]

    def describe(self) -> str:
        """One line for logs."""
        return (f"conv2d {self.C}->{self.F} {self.kh}x{self.kw} stride {self.sh},{self.sw} "
                f"pad {self.ph},{self.pw} -> {self.out_shape}")


@register("maxpool2d")
class MaxPool2D:
    """Max pooling over (kh, kw) windows (no padding, floor like torch); gradient to the argmax."""

    kind = "maxpool2d"

    def __init__(self, in_shape, kernel, stride):
        C, H, Wd = in_shape
        self.in_shape = tuple(in_shape)
        (self.kh, self.kw), (self.sh, self.sw) = kernel, stride
        spec = {"type": "maxpool2d"}
        self.Ho = _out_size(H, self.kh, self.sh, 0, spec)
        self.Wo = _out_size(Wd, self.kw, self.sw, 0, spec)
        self.out_shape = (C, self.Ho, self.Wo)
        self.training = True

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int) -> "MaxPool2D":
        """MaxPool2D from {"type": "maxpool2d", "kernel": k, "stride": k (default: kernel)}."""
        if len(in_shape) != 3:
            raise ValueError(f"maxpool2d needs a (C, H, W) input, got {in_shape}")
        kernel = _pair(spec, "kernel")
        return cls(in_shape, kernel, _pair(spec, "stride", list(kernel)))

    def param_shapes(self) -> list:
        """No parameters."""
        return []

    def bind(self, params: dict, grads: dict) -> None:
        """Nothing to bind."""

    def forward(self, x):
        """y = max over each window; caches the argmax position in the window."""
        N, C = x.shape[:2]
        win = _windows(x, self.kh, self.kw, self.sh, self.sw, self.Ho, self.Wo)
        win = win.reshape(N, C, self.Ho, self.Wo, self.kh * self.kw)  # copy: (N, C, Ho, Wo, kh*kw)
        self.argmax = win.argmax(axis=-1)[..., None]  # (N, C, Ho, Wo, 1)
        self.x_shape = x.shape
        return np.take_along_axis(win, self.argmax, axis=-1)[..., 0]

    def backward(self, dy):
        """Route dy to the argmax of each window."""
        N, C = dy.shape[:2]
        dwin = np.zeros((N, C, self.Ho, self.Wo, self.kh * self.kw), dtype=dy.dtype)
        np.put_along_axis(dwin, self.argmax, dy[..., None], axis=-1)
        dwin = dwin.reshape(N, C, self.Ho, self.Wo, self.kh, self.kw).transpose(0, 1, 4, 5, 2, 3)
        return _col2im(dwin, self.x_shape, self.sh, self.sw)

    def describe(self) -> str:
        """One line for logs."""
        return f"maxpool2d {self.kh}x{self.kw} stride {self.sh},{self.sw} -> {self.out_shape}"


@register("flatten")
class Flatten:
    """(N, C, H, W) -> (N, C*H*W), C-order like torch.nn.Flatten."""

    kind = "flatten"

    def __init__(self, in_shape):
        self.in_shape = tuple(in_shape)
        self.out_shape = (int(np.prod(in_shape)),)
        self.training = True

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int) -> "Flatten":
        """Flatten from {"type": "flatten"}."""
        return cls(in_shape)

    def param_shapes(self) -> list:
        """No parameters."""
        return []

    def bind(self, params: dict, grads: dict) -> None:
        """Nothing to bind."""

    def forward(self, x):
        """Reshape to (N, features)."""
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        """Reshape back to (N, *in_shape)."""
        return dy.reshape(dy.shape[0], *self.in_shape)

    def describe(self) -> str:
        """One line for logs."""
        return f"flatten {self.in_shape} -> {self.out_shape}"
