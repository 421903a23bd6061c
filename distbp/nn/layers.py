"""The layer contract, the layer registry, the shared step context, and the dense layers.

A layer is a class registered under its spec name with ``@register("name")``; a model is a
list of specs like ``{"type": "linear", "out": 64}`` (``model.layers`` in a config; a layer
registered in the user's own module is ``{"type": "module:ClassName"}``). A layer class
implements:

- ``build(cls, spec, in_shape, index, seed)`` (classmethod): read and check the spec with
  ``check_spec`` and ``spec_value`` (errors are ValueError naming ``layer {index} (type)``
  and the key), return the layer for inputs of shape ``(N, *in_shape)``;
- ``out_shape``: the per-row output shape;
- ``forward(x)``: the output for a batch, caching only what ``backward`` needs;
- ``backward(dy)``: return ``dx`` and ADD the parameter gradients into the bound views
  (``Sequential.zero_grad`` zeroes them once per step).

A layer with parameters also implements ``param_shapes()`` ([(name, shape)], the order of
the flat vector), ``bind(params, grads)`` (keep the views by name) and
``init_params(rng)``; ``WeightLayer`` does all three for a weight W and optional bias b.
Non-trained state (BatchNorm's running statistics) uses ``buffer_shapes()``,
``bind_buffers(views)`` and ``init_buffers()``. ``training`` (train/eval mode) and ``ctx``
(the ``Context``: step, comm, global rows) are set by Sequential.

Copy-saving flags. The defaults below are always safe; set a class flag only when true:

- ``private_output`` (default False): forward returns a fresh array no one else keeps, so
  the next layer may overwrite it;
- ``private_dx`` (default False): backward returns a fresh array, so the previous layer
  may overwrite it;
- ``writes_grads`` (default False): after ``zero_grad(skip_written=True)`` backward writes
  every gradient entry (instead of adding), when ``grads_zero`` is set.

Sequential derives two instance flags from its neighbours; a layer may use them and
otherwise ignores them: ``overwrite_x`` (forward may write into x) and ``overwrite_dy``
(backward may write into dy). ``need_dx`` (set on the first layer with parameters)
says whether backward must return dx. ``Softplus`` below is a small worked example.

Containers (nn/blocks.py). A block is a layer whose work is done by sub-layers: its spec
holds nested layer lists (``{"type": "residual", "body": [...], "shortcut": [...]}``),
``build`` turns each into a ``Chain`` with ``Chain.build(specs, in_shape, seed,
f"{index}.{kind}.{name}")`` (so a sub-layer's index, in its errors too, is its path, e.g.
``3.residual.body.0``) and ``chains()`` lists them as (name, chain) in parameter order.
The model owns the sub-layers like its own: their parameters are views of the one flat
vector, depth-first in spec order (the block's chains in ``chains()`` order), named
``{path}.{kind}.{pname}`` (``3.residual.body.0.conv2d.W``); it binds and initialises them
(the c-th sub-layer of layer i draws from a generator of (seed, i, c)), and sets ctx and
train/eval. The flags inside a block: each chain links its own neighbours as Sequential
does; at the ends, a path's first layer never gets overwrite_x and its last never gets
overwrite_dy when the input or the gradient is shared by several paths (a residual's x
feeds body and shortcut, its dy reaches both), and a fan-out ADDS the paths' dx. ``Residual``
(y = body(x) + shortcut(x)) is the worked example: ``Fork`` runs the paths and sums dx,
Residual only builds, checks the shapes and says how the outputs join (``join``) and dy
splits (``split``). A user block registers with ``@register`` like a user layer.
"""

import math

import numpy as np

from . import refs, threads
from .counter_rng import MASK64, dropout_bits
from .erf import gelu_cdf
from .init import INITS

LAYER_TYPES: dict[str, type] = {}


def register(name: str):
    """Class decorator adding a layer class to LAYER_TYPES under ``name`` (its kind)."""

    def add(cls):
        if "kind" not in cls.__dict__:
            cls.kind = name
        return refs.add(LAYER_TYPES, name, cls, "layer")

    return add


def layer_class(type_name) -> type:
    """The layer class of a spec's type: a registered name, or `module:Name` (the module is imported)."""
    return refs.lookup(type_name, LAYER_TYPES, "layer", "distbp.nn.register")


def check_spec(spec: dict, index: int, allowed: tuple = ()) -> None:
    """Raise ValueError naming any key of ``spec`` other than "type" and ``allowed``."""
    unknown = sorted(set(spec) - {"type", *allowed})
    if unknown:
        raise ValueError(f"layer {index} ({spec.get('type')}): unknown key(s) {unknown}; "
                         f"allowed keys: {['type', *allowed]}")


_REQUIRED = object()
# values of a weight gradient computed between two MPI progress calls under train.overlap (1 MB float32)
PROGRESS_ITEMS = 1 << 18


def _is_a(v, kind: type) -> bool:
    """Whether v is a TOML value of kind: bool only for bool, an int also for float."""
    if kind is bool or isinstance(v, bool):
        return kind is bool and isinstance(v, bool)
    return isinstance(v, int | float) if kind is float else isinstance(v, kind)


def spec_value(spec: dict, index: int, key: str, kind: type, default=_REQUIRED, ok=lambda v: True,
               want: str = ""):
    """spec[key] (default when absent) if it is a `kind` (int, float, bool, str) and ok(it); else ValueError."""
    v = spec.get(key, default)
    if v is _REQUIRED or not _is_a(v, kind) or not ok(v):
        got = "missing" if v is _REQUIRED else repr(v)
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        raise ValueError(f"layer {index} ({spec.get('type')}): {key}={got} must be {article} {kind.__name__}"
                         f"{' ' + want if want else ''}")
    return float(v) if kind is float else v


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
    need_dx = True
    grads_zero = False  # set by Sequential.zero_grad: this layer's gradients are all zero
    writes_grads = False  # backward after grads_zero writes every gradient entry instead of adding
    # train.overlap: Chain.backward's hook for this layer while a gradient reduction overlaps backward.
    # A layer with parameters calls after_grads() once its gradients are final, before its dx product
    # (their buckets' reductions may start); one with grads_in_order calls after_grads(n) whenever its
    # first n gradient values (param_shapes order) are final, between the parts of its weight gradient
    # (each call also lets MPI move pending reductions on, which it does only inside MPI calls)
    after_grads = None
    grads_in_order = False

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


def activation_names() -> tuple[str, ...]:
    """Names of the registered element-wise activations (model.activation's choices)."""
    return tuple(n for n, cls in LAYER_TYPES.items() if issubclass(cls, Activation))


class WeightLayer(Layer):
    """A layer with a weight W and an optional bias b (Linear, Conv2D): spec options, binding, init.

    Subclasses set ``w_shape``, ``fans`` (fan_in, fan_out), ``n_out`` (the bias size), ``bias``
    and ``init`` (a scheme of nn.init, or None: Sequential picks one from the next activation,
    and ``default_scheme`` applies outside a Sequential).
    """

    private_output = True
    private_dx = True
    default_scheme = "glorot_uniform"

    @staticmethod
    def read_options(spec: dict, index: int) -> tuple[bool, str | None]:
        """The spec's "bias" (bool, default true) and "init" (a scheme name, default unset)."""
        bias = spec_value(spec, index, "bias", bool, True)
        if "init" not in spec:
            return bias, None
        return bias, spec_value(spec, index, "init", str, ok=lambda v: v in INITS, want=f"in {sorted(INITS)}")

    def param_shapes(self) -> list:
        """[("W", w_shape), ("b", (n_out,))], without b when bias is off."""
        return [("W", self.w_shape)] + ([("b", (self.n_out,))] if self.bias else [])

    def bind(self, params: dict, grads: dict) -> None:
        """Keep the views of W, b and their gradients."""
        self.W, self.dW = params["W"], grads["W"]
        self.b, self.db = params.get("b"), grads.get("b")

    def init_params(self, rng: np.random.Generator) -> None:
        """Fill W with the chosen scheme on (fan_in, fan_out), b with zeros."""
        self.W[...] = INITS[self.init or self.default_scheme](rng, *self.fans, self.W.shape)
        if self.b is not None:
            self.b[...] = 0


@register("linear")
class Linear(WeightLayer):
    """Fully connected layer y = x @ W + b with W of shape (D_in, D_out)."""

    writes_grads = True
    grads_in_order = True  # dW in row blocks, W first: train.overlap cuts a large layer's gradient into buckets
    relu = False  # set by Chain.link when a ReLU follows and a bias is added: the bias pass rectifies too
    masks_dy = False  # the ReLU after it still masks dy: the products need the whole masked dy anyway

    def __init__(self, d_in: int, d_out: int, bias: bool = True, init: str | None = None, lead: tuple = ()):
        if init is not None and init not in INITS:
            raise ValueError(f"linear init={init!r} is unknown; use one of {sorted(INITS)}")
        self.d_in, self.d_out, self.bias, self.init = d_in, d_out, bias, init
        self.w_shape, self.fans, self.n_out = (d_in, d_out), (d_in, d_out), d_out
        self.out_shape = (*lead, d_out)  # lead: (T,) for (N, T, D_in) sequences
        self._dW_tmp = None

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "linear", "out": 128[, "bias": true, "init": "he_normal"]} on (D,) or (T, D)."""
        check_spec(spec, index, ("out", "bias", "init"))
        if len(in_shape) not in (1, 2):
            raise ValueError(f"layer {index} (linear) needs a flat input (D,) or a sequence (T, D) but gets shape "
                             f"{tuple(in_shape)}; add {{'type': 'flatten'}} before it")
        out = spec_value(spec, index, "out", int, ok=lambda v: v >= 1, want=">= 1, the output size")
        return cls(in_shape[-1], out, *cls.read_options(spec, index), lead=tuple(in_shape[:-1]))

    def forward(self, x):
        """y = x @ W + b over the last axis."""
        self.x = x.reshape(-1, self.d_in)           # (N, D_in); (N*T, D_in) for sequences
        y = threads.matmul(self.x, self.W)          # (N, D_out)
        if self.b is not None:
            threads.add_rows(y, self.b, self.relu)
        return y.reshape(*x.shape[:-1], self.d_out)

    def fuses_relu(self) -> bool:
        """Whether a following ReLU can run inside forward's bias pass (only when there is a bias pass)."""
        return self.b is not None

    def backward(self, dy):
        """dW += x.T @ dy, db += sum(dy), return dy @ W.T (None if need_dx is off)."""
        shape, dy = dy.shape, dy.reshape(-1, self.d_out)
        if self.grads_zero:  # zero_grad ran: writing equals adding to 0 and saves a pass over dW
            self._weight_grad(dy)                   # (D_in, D_out)
            if self.db is not None:
                dy.sum(axis=0, out=self.db)         # (D_out,); the method skips np.sum's dispatch
            self.grads_zero = False
        else:
            if self._dW_tmp is None:
                self._dW_tmp = np.empty_like(self.dW)
            threads.matmul(self.x.T, dy, out=self._dW_tmp)
            self.dW += self._dW_tmp
            if self.db is not None:
                self.db += dy.sum(axis=0)
        if self.after_grads:
            self.after_grads()
        return threads.matmul(dy, self.W.T).reshape(*shape[:-1], self.d_in) if self.need_dx else None  # (N, D_in)

    def _weight_grad(self, dy):
        """dW = x.T @ dy; under an overlapped reduction in row blocks, MPI progressed between them."""
        if not self.after_grads:
            threads.matmul(self.x.T, dy, out=self.dW)
            return
        step = max(1, -(-self.d_in // max(1, self.dW.size // PROGRESS_ITEMS)))
        for lo in range(0, self.d_in, step):
            threads.matmul(self.x[:, lo:lo + step].T, dy, out=self.dW[lo:lo + step])
            self.after_grads(min(lo + step, self.d_in) * self.d_out)  # W's rows so far: the layer's first values


@register("relu")
class ReLU(Activation):
    """y = max(x, 0).

    ``fused`` (set by Chain.link) is the layer before when it rectifies its own output in its last pass
    (Conv2D, BatchNorm, Linear with a bias; see Chain.fuse_relu): forward then passes x on, and backward passes dy on
    when that layer also masks dy (its ``masks_dy``): the same arithmetic, one pass over the activations fewer.
    """

    fused = None

    def forward(self, x):
        """Rectify; keeps y for the mask."""
        if self.fused is not None:
            self.y = x  # rectified by the layer before, in place as this layer would have done
            return x
        self.y = threads.elementwise(lambda y, x: threads.relu(x, y), threads.like(x, self._out(x)), x)
        return self.y

    def backward(self, dy):
        """dx = dy where y > 0, else 0."""
        if self.fused is not None and self.fused.masks_dy:
            return dy
        return threads.elementwise(lambda dx, dy, y: np.multiply(dy, y > 0, out=dx),
                                   threads.like(dy, self._dx(dy)), dy, self.y)


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
        return cls(in_shape, spec_value(spec, index, "slope", float, 0.01, lambda v: v >= 0, ">= 0"))

    def forward(self, x):
        """Scale the non-positive entries by the slope; keeps y (same sign as x)."""
        def leaky(y, x):
            np.copyto(y, x)  # a no-op when y is x
            np.multiply(y, self.slope, out=y, where=y < 0)

        self.y = threads.elementwise(leaky, threads.like(x, self._out(x)), x)
        return self.y

    def backward(self, dy):
        """dx = dy where x > 0, slope * dy otherwise."""
        def leaky(dx, dy, y):
            np.copyto(dx, dy)
            np.multiply(dx, self.slope, out=dx, where=y <= 0)

        return threads.elementwise(leaky, threads.like(dy, self._dx(dy)), dy, self.y)


@register("tanh")
class Tanh(Activation):
    """y = tanh(x)."""

    def forward(self, x):
        """Keeps y for backward."""
        self.y = threads.elementwise(lambda y, x: np.tanh(x, out=y), threads.like(x, self._out(x)), x)
        return self.y

    def backward(self, dy):
        """dx = dy * (1 - y^2)."""
        def tanh_grad(dx, dy, y):
            g = y * y
            np.subtract(1, g, out=g)
            np.multiply(dy, g, out=dx)

        return threads.elementwise(tanh_grad, threads.like(dy, self._dx(dy)), dy, self.y)


@register("sigmoid")
class Sigmoid(Activation):
    """y = 1 / (1 + exp(-x)); exp overflow for very negative x gives the exact limit 0."""

    def forward(self, x):
        """Keeps y for backward."""
        def sigmoid(y, x):
            np.negative(x, out=y)
            with np.errstate(over="ignore"):  # per block: error states are per thread
                np.exp(y, out=y)
            y += 1
            np.reciprocal(y, out=y)

        self.y = threads.elementwise(sigmoid, threads.like(x, self._out(x)), x)
        return self.y

    def backward(self, dy):
        """dx = dy * y * (1 - y)."""
        def sigmoid_grad(dx, dy, y):
            g = np.subtract(1, y)
            g *= y
            np.multiply(dy, g, out=dx)

        return threads.elementwise(sigmoid_grad, threads.like(dy, self._dx(dy)), dy, self.y)


@register("gelu")
class GELU(Activation):
    """GELU, the tanh approximation (torch's approximate="tanh") or with approximate="none" the exact erf form.

    Exact: y = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) (torch's default). tanh form: y = 0.5 x (1 + tanh(c (x + k x^3))), c = sqrt(2/pi), k = 0.044715.
    """

    private_output = True
    C, K = math.sqrt(2.0 / math.pi), 0.044715

    def __init__(self, shape: tuple, approximate: str = "tanh"):
        super().__init__(shape)
        self.approximate = approximate

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "gelu"[, "approximate": "tanh" | "none"]}."""
        check_spec(spec, index, ("approximate",))
        return cls(in_shape, spec_value(spec, index, "approximate", str, "tanh", lambda v: v in ("tanh", "none"),
                                        'of "tanh" or "none" (the exact erf form)'))

    def forward(self, x):
        """The chosen form; keeps what backward needs."""
        if self.approximate == "none":
            self.x, self.cdf = x, gelu_cdf(x)
            return x * self.cdf
        return self._forward_tanh(x)

    def backward(self, dy):
        """dx = dy * dy/dx of the chosen form."""
        if self.approximate == "none":  # d/dx x Phi(x) = Phi(x) + x phi(x)
            x = self.x
            g = np.exp(-0.5 * x * x)
            g *= x * (1.0 / math.sqrt(2.0 * math.pi))
            g += self.cdf
            return np.multiply(dy, g, out=dy if self.overwrite_dy else g)
        return self._backward_tanh(dy)

    def _forward_tanh(self, x):
        """Keeps x and t = tanh(c (x + k x^3)) for backward."""
        def gelu(y, t, x):
            np.multiply(x, x, out=t)
            t *= self.K
            t += 1
            t *= x
            t *= self.C
            np.tanh(t, out=t)
            np.add(t, 1, out=y)
            y *= x
            y *= 0.5

        t, y = np.empty_like(x), np.empty_like(x)  # (N, D)
        threads.elementwise(gelu, y, t, x)
        self.x, self.t = x, t
        return y

    def _backward_tanh(self, dy):
        """dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3k x^2))."""
        def gelu_grad(dx, dy, x, t):
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
            np.multiply(dy, g, out=dx)

        return threads.elementwise(gelu_grad, threads.like(dy, self._dx(dy)), dy, self.x, self.t)


@register("softplus")
class Softplus(Activation):
    """y = log(1 + exp(beta x)) / beta, and y = x where beta x > threshold (torch.nn.Softplus)."""

    private_output = True  # forward returns a fresh array

    def __init__(self, shape: tuple, beta: float = 1.0, threshold: float = 20.0):
        super().__init__(shape)
        self.beta, self.threshold = beta, threshold

    @classmethod
    def build(cls, spec: dict, in_shape: tuple, index: int, seed: int):
        """Build from {"type": "softplus"[, "beta": 1.0, "threshold": 20.0]}."""
        check_spec(spec, index, ("beta", "threshold"))
        beta = spec_value(spec, index, "beta", float, 1.0, lambda v: v > 0, "> 0")
        threshold = spec_value(spec, index, "threshold", float, 20.0, math.isfinite, "that is finite")
        return cls(in_shape, beta, threshold)

    def forward(self, x):
        """Keeps the slope dy/dx = sigmoid(beta x) (1 on the linear part) for backward."""
        def softplus(y, slope, x):
            z = x * self.beta
            linear = z > self.threshold
            np.exp(-np.logaddexp(0, -z), out=slope)  # sigmoid(z), no overflow
            slope[linear] = 1
            np.logaddexp(0, z, out=y)                 # log(1 + exp(z)), no overflow
            y /= self.beta
            np.copyto(y, x, where=linear)

        y, self.slope = np.empty_like(x), np.empty_like(x)
        return threads.elementwise(softplus, y, self.slope, x)

    def backward(self, dy):
        """dx = dy * sigmoid(beta x), or dy on the linear part."""
        return threads.elementwise(lambda dx, dy, s: np.multiply(dy, s, out=dx), threads.like(dy, self._dx(dy)),
                                   dy, self.slope)


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
        p = spec_value(spec, index, "p", float, 0.5, lambda v: 0 <= v < 1, "in [0, 1)")
        return cls(in_shape, p, index, seed)

    def keep_mask(self, n: int) -> np.ndarray:
        """Boolean keep mask (n, *out_shape) for the current ctx step and rows."""
        ctx = self.ctx or Context()
        rows = ctx.rows_for(n)
        width = math.prod(self.out_shape)
        bits = dropout_bits(self.seed, ctx.step, self.index, rows, width)
        threshold = np.uint64(min(math.ceil(self.p * 2.0**64), MASK64))
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
