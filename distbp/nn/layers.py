"""Layer protocol, registry, shared step context and the dense layers.

Every layer follows the protocol in INTERFACES.md: ``build(spec, in_shape, index, seed)``,
``out_shape``, ``param_shapes()`` and ``bind(params, grads)`` for views into the model's
flat vectors, ``forward(x)`` caching only what ``backward(dy)`` needs, and ``backward``
returning ``dx`` while ADDING into its gradient views.

Sequential may set two flags to save copies: ``overwrite_x`` (the input of ``forward``
is a temporary nobody else keeps, so it may be overwritten) and ``overwrite_dy`` (same
for the input of ``backward``). A layer tells its neighbours it hands out such
temporaries through the class flags ``private_output`` and ``private_dx``.
"""

import math

import numpy as np

from .init import INITS

LAYER_TYPES: dict[str, type] = {}


def register(name: str):
    """Class decorator adding a layer class to LAYER_TYPES under ``name`` (its kind)."""

    def add(cls):
        if name in LAYER_TYPES:
            raise ValueError(f"layer type {name!r} registered twice")
        if "kind" not in cls.__dict__:
            cls.kind = name
        LAYER_TYPES[name] = cls
        return cls

    return add


def check_spec(spec: dict, index: int, allowed: tuple = ()) -> None:
    """Raise ValueError naming any key of ``spec`` other than "type" and ``allowed``."""
    unknown = sorted(set(spec) - {"type", *allowed})
    if unknown:
        raise ValueError(f"layer {index} ({spec.get('type')}): unknown key(s) {unknown}; "
                         f"allowed keys: {['type', *allowed]}")


class Context:
    """Per-step state shared by all layers of a model; the trainer sets it each step."""

    def __init__(self):
        self.step = 0
        self.comm = None
        self.local_rows = 0
        self._rows = None
        self._global_rows = None

    @property
    def rows(self) -> np.ndarray:
        """Global batch positions of the local rows; arange(local rows) unless set."""
        if self._rows is None:
            return np.arange(self.local_rows, dtype=np.int64)
        return self._rows

    @rows.setter
    def rows(self, value) -> None:
        self._rows = None if value is None else np.asarray(value, dtype=np.int64)

    @property
    def global_rows(self) -> int:
        """Rows in the global batch; the local row count unless set."""
        return self.local_rows if self._global_rows is None else self._global_rows

    @global_rows.setter
    def global_rows(self, value) -> None:
        self._global_rows = None if value is None else int(value)

    def rows_for(self, n: int) -> np.ndarray:
        """Global positions of a batch of n local rows; checks a set ``rows`` has n entries."""
        if self._rows is None:
            return np.arange(n, dtype=np.int64)
        if len(self._rows) != n:
            raise ValueError(f"ctx.rows has {len(self._rows)} entries but the batch has {n} "
                             "rows; set model.ctx.rows to the global positions of the local rows")
        return self._rows


class Layer:
    """Defaults of the layer protocol for a layer without parameters or state."""

    kind = "layer"
    training = True
    ctx = None
    overwrite_x = False
    overwrite_dy = False
    private_output = False
    private_dx = False
    grads_zero = False  # set by Sequential.zero_grad: this layer's gradients are all zero
    writes_grads = False  # backward after grads_zero writes every gradient entry instead of adding

    def param_shapes(self) -> list:
        """Names and shapes of the trained parameters (none)."""
        return []

    def bind(self, params: dict, grads: dict) -> None:
        """Receive views of the parameters and gradients (nothing to bind)."""


class Activation(Layer):
    """Base of element-wise activations: shape in equals shape out."""

    private_dx = True

    def __init__(self, shape: tuple):
        self.out_shape = tuple(shape)

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from a spec like {"type": "relu"}."""
        check_spec(spec, index)
        return cls(in_shape)

    def _out(self, x):
        """Array the forward result goes into: x itself when allowed."""
        return x if self.overwrite_x else None

    def _dx(self, dy):
        """Array the backward result goes into: dy itself when allowed."""
        return dy if self.overwrite_dy else None


@register("linear")
class Linear(Layer):
    """Fully connected layer y = x @ W + b with W of shape (D_in, D_out)."""

    private_output = True
    private_dx = True
    writes_grads = True

    def __init__(self, d_in: int, d_out: int, bias: bool = True, init: str | None = None):
        if init is not None and init not in INITS:
            raise ValueError(f"linear init={init!r} is unknown; use one of {sorted(INITS)}")
        self.d_in, self.d_out, self.bias, self.init = d_in, d_out, bias, init
        self.out_shape = (d_out,)
        self.need_dx = True
        self._dW_tmp = None

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "linear", "out": 128[, "bias": true, "init": "he_normal"]}."""
        check_spec(spec, index, ("out", "bias", "init"))
        if len(in_shape) != 1:
            raise ValueError(f"layer {index} (linear) needs a flat input but gets shape "
                             f"{tuple(in_shape)}; add {{'type': 'flatten'}} before it")
        if "out" not in spec or int(spec["out"]) < 1:
            raise ValueError(f"layer {index} (linear) needs a positive 'out' size, got "
                             f"{spec.get('out')!r}")
        return cls(in_shape[0], int(spec["out"]), bool(spec.get("bias", True)), spec.get("init"))

    def param_shapes(self) -> list:
        """[("W", (D_in, D_out)), ("b", (D_out,))], without b when bias is off."""
        shapes = [("W", (self.d_in, self.d_out))]
        return shapes + [("b", (self.d_out,))] if self.bias else shapes

    def bind(self, params: dict, grads: dict) -> None:
        """Keep the views of W, b and their gradients."""
        self.W, self.dW = params["W"], grads["W"]
        self.b, self.db = params.get("b"), grads.get("b")

    def init_params(self, rng: np.random.Generator) -> None:
        """Fill W with the chosen scheme (Glorot uniform if unset) and b with zeros."""
        fill = INITS[self.init or "glorot_uniform"]
        self.W[...] = fill(rng, self.d_in, self.d_out, self.W.shape)
        if self.b is not None:
            self.b[...] = 0

    def forward(self, x):
        """y = x @ W + b."""
        self.x = x                                  # (N, D_in)
        y = x @ self.W                              # (N, D_out)
        if self.b is not None:
            y += self.b
        return y

    def backward(self, dy):
        """dW += x.T @ dy, db += sum(dy), return dy @ W.T (None if need_dx is off)."""
        if self.grads_zero:  # zero_grad ran: writing equals adding to 0 and saves a pass over dW
            np.matmul(self.x.T, dy, out=self.dW)   # (D_in, D_out)
            if self.db is not None:
                dy.sum(axis=0, out=self.db)         # (D_out,); the method skips np.sum's dispatch
            self.grads_zero = False
        else:
            if self._dW_tmp is None:
                self._dW_tmp = np.empty_like(self.dW)
            np.matmul(self.x.T, dy, out=self._dW_tmp)
            self.dW += self._dW_tmp
            if self.db is not None:
                self.db += dy.sum(axis=0)
        return dy @ self.W.T if self.need_dx else None  # (N, D_in)


@register("relu")
class ReLU(Activation):
    """y = max(x, 0)."""

    def forward(self, x):
        """Rectify; keeps y for the mask."""
        self.y = np.maximum(x, 0, out=self._out(x))
        return self.y

    def backward(self, dy):
        """dx = dy where y > 0, else 0."""
        return np.multiply(dy, self.y > 0, out=self._dx(dy))


@register("leaky_relu")
class LeakyReLU(Activation):
    """y = x for x > 0, slope * x otherwise (slope >= 0, default 0.01 as in torch)."""

    def __init__(self, shape: tuple, slope: float = 0.01):
        super().__init__(shape)
        self.slope = slope

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "leaky_relu"[, "slope": 0.01]}."""
        check_spec(spec, index, ("slope",))
        slope = float(spec.get("slope", 0.01))
        if slope < 0:
            raise ValueError(f"layer {index} (leaky_relu): slope={slope} must be >= 0")
        return cls(in_shape, slope)

    def forward(self, x):
        """Scale the non-positive entries by the slope; keeps y (same sign as x)."""
        y = x if self.overwrite_x else x.copy()
        np.multiply(y, self.slope, out=y, where=y < 0)
        self.y = y
        return y

    def backward(self, dy):
        """dx = dy where x > 0, slope * dy otherwise."""
        dx = dy if self.overwrite_dy else dy.copy()
        np.multiply(dx, self.slope, out=dx, where=self.y <= 0)
        return dx


@register("tanh")
class Tanh(Activation):
    """y = tanh(x)."""

    def forward(self, x):
        """Keeps y for backward."""
        self.y = np.tanh(x, out=self._out(x))
        return self.y

    def backward(self, dy):
        """dx = dy * (1 - y^2)."""
        g = self.y * self.y
        np.subtract(1, g, out=g)
        return np.multiply(dy, g, out=dy if self.overwrite_dy else g)


@register("sigmoid")
class Sigmoid(Activation):
    """y = 1 / (1 + exp(-x)); exp overflow for very negative x gives the exact limit 0."""

    def forward(self, x):
        """Keeps y for backward."""
        y = np.negative(x, out=self._out(x))
        with np.errstate(over="ignore"):
            np.exp(y, out=y)
        y += 1
        self.y = np.reciprocal(y, out=y)
        return self.y

    def backward(self, dy):
        """dx = dy * y * (1 - y)."""
        g = np.subtract(1, self.y)
        g *= self.y
        return np.multiply(dy, g, out=dy if self.overwrite_dy else g)


@register("gelu")
class GELU(Activation):
    """GELU, tanh approximation (torch GELU(approximate="tanh")): numpy has no erf.

    y = 0.5 x (1 + tanh(c (x + k x^3))), c = sqrt(2/pi), k = 0.044715.
    """

    private_output = True
    C, K = math.sqrt(2.0 / math.pi), 0.044715

    def forward(self, x):
        """Keeps x and t = tanh(c (x + k x^3)) for backward."""
        t = x * x                                   # (N, D)
        t *= self.K
        t += 1
        t *= x
        t *= self.C
        np.tanh(t, out=t)
        y = t + 1
        y *= x
        y *= 0.5
        self.x, self.t = x, t
        return y

    def backward(self, dy):
        """dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3k x^2))."""
        x, t = self.x, self.t
        g = x * x
        g *= 3 * self.K
        g += 1
        g *= self.C
        g *= x
        s = t * t
        np.subtract(1, s, out=s)
        g *= s
        g += t
        g += 1
        g *= 0.5
        return np.multiply(dy, g, out=dy if self.overwrite_dy else g)


_GAMMA = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _mix_int(z: int) -> int:
    """splitmix64 finalizer on a Python int (mod 2^64)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix_array(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer applied in place to a uint64 array (wraps mod 2^64)."""
    tmp = np.right_shift(z, 30)
    z ^= tmp
    z *= np.uint64(0xBF58476D1CE4E5B9)
    np.right_shift(z, 27, out=tmp)
    z ^= tmp
    z *= np.uint64(0x94D049BB133111EB)
    np.right_shift(z, 31, out=tmp)
    z ^= tmp
    return z


def dropout_bits(seed: int, step: int, index: int, rows: np.ndarray, width: int) -> np.ndarray:
    """Counter-based uint64 bits (len(rows), width) from (seed, step, index, row, column)."""
    key = 0
    for v in (seed, step, index):
        key = _mix_int(((key ^ (int(v) & _MASK64)) + _GAMMA) & _MASK64)
    row_key = np.asarray(rows, dtype=np.int64).astype(np.uint64)  # (n,)
    row_key ^= np.uint64(key)
    row_key += np.uint64(_GAMMA)
    _mix_array(row_key)
    cols = np.arange(1, width + 1, dtype=np.uint64) * np.uint64(_GAMMA)  # (width,)
    return _mix_array(row_key[:, None] + cols)     # (n, width): splitmix64 stream per row


@register("dropout")
class Dropout(Layer):
    """Inverted dropout: drop with probability p, scale kept entries by 1/(1-p) in training.

    The mask of an entry is a hash of (seed, ctx.step, layer index, global row ctx.rows[i],
    column), so a sample gets the same mask on whichever rank processes it. Identity in
    eval mode. The trainer must advance ctx.step, or the same masks repeat.
    """

    def __init__(self, shape: tuple, p: float, index: int = 0, seed: int = 0):
        if not 0 <= p < 1:
            raise ValueError(f"dropout p={p} must be in [0, 1)")
        self.out_shape, self.p, self.index, self.seed = tuple(shape), p, index, seed
        self.mask = None

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "dropout", "p": 0.1}."""
        check_spec(spec, index, ("p",))
        return cls(in_shape, float(spec.get("p", 0.5)), index, seed)

    def keep_mask(self, n: int) -> np.ndarray:
        """Boolean keep mask (n, *out_shape) for the current ctx step and rows."""
        ctx = self.ctx or Context()
        rows = ctx.rows_for(n)
        width = math.prod(self.out_shape)
        bits = dropout_bits(self.seed, ctx.step, self.index, rows, width)
        threshold = np.uint64(min(math.ceil(self.p * 2.0**64), _MASK64))
        return (bits >= threshold).reshape((n, *self.out_shape))

    def forward(self, x):
        """x * mask / (1 - p) in training; x unchanged in eval or when p == 0."""
        if not self.training or self.p == 0:
            self.mask = None
            return x
        self.mask = np.multiply(self.keep_mask(len(x)), 1.0 / (1.0 - self.p), dtype=x.dtype)
        return np.multiply(x, self.mask, out=x if self.overwrite_x else None)

    def backward(self, dy):
        """dx = dy * mask / (1 - p), or dy when the forward was the identity."""
        if self.mask is None:
            return dy
        return np.multiply(dy, self.mask, out=dy if self.overwrite_dy else None)
