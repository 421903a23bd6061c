"""Optimizers on one flat parameter vector and its gradient.

SGD, Adam, AdamW and RMSprop follow torch.optim's default (single-tensor, maximize=False,
amsgrad=False) update equations; state names are torch's (momentum_buffer, exp_avg,
exp_avg_sq, square_avg, grad_avg) and `t` counts the steps taken. Differences from torch:

- the learning rate is an argument of `step` (the schedule is a pure function of the
  step, so a resumed run gets exactly the same rate); constructors take the vector's
  size and dtype instead, and allocate all state there;
- Adam/AdamW fold the bias corrections into two scalars: p -= (lr*sqrt(bc2)/bc1) *
  m / (sqrt(v) + eps*sqrt(bc2)), the same value as torch's
  p -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps) up to rounding, one pass fewer;
- arithmetic happens in the parameters' dtype with the scalars rounded to it, so float32
  results agree with torch to rounding, not bitwise;
- ranges are checked more strictly: momentum, alpha and betas in [0, 1), eps > 0.

`make_optimizer` ignores hyperparameters the named optimizer does not use (a config
carries one set for all of them) and those given as None, which keep the class's own
default (torch's: AdamW weight_decay 0.01, momentum 0), so an explicit 0.0 turns AdamW's
decay off. OPTIMIZERS is the registry by name; `defaults(name)` reads a class's options.

The update is memory-bound, so `step` walks the vector in blocks of CHUNK_BYTES per
array and does every pass of the update on a block while it is still in cache (what that
saves: docs/PERFORMANCE.md, "Choices in the code"). `grad` is used as scratch.
"""
from __future__ import annotations

import inspect
import math

import numpy as np

from .errors import require

CHUNK_BYTES = 2**19


def _require(ok: bool, message: str):
    """Raise ValueError(message) unless ok (the config turns it into an error naming the key)."""
    require(ok, message, ValueError)


def _unit(name: str, x: float, closed: bool = False):
    """Check 0 <= x < 1 (or <= 1 when closed), naming the hyperparameter."""
    ok = 0.0 <= x <= 1.0 if closed else 0.0 <= x < 1.0
    _require(ok, f"optim.{name}={x} must be in [0, {'1]' if closed else '1)'}")


class Optimizer:
    """Flat state arrays, the step counter t and the cache-blocked step loop."""

    name = ""
    owned = None  # updates the whole vector (zero.ShardedOptimizer: one rank's slice)

    def __init__(self, n: int, dtype, state_names: tuple[str, ...]):
        _require(isinstance(n, (int, np.integer)) and n > 0,
                 f"n={n!r} must be a positive number of parameters")
        self.dtype = np.dtype(dtype)
        _require(self.dtype.kind == "f", f"dtype={self.dtype} must be a floating type, e.g. float32")
        self.n, self.t = int(n), 0
        self.state = {k: np.zeros(self.n, self.dtype) for k in state_names}
        chunk = max(1, CHUNK_BYTES // self.dtype.itemsize)
        scratch = np.empty(min(self.n, chunk), self.dtype)
        self._blocks = [(slice(a, a + chunk), tuple(x[a:a + chunk] for x in self.state.values()),
                         scratch[:min(chunk, self.n - a)]) for a in range(0, self.n, chunk)]

    def step(self, params: np.ndarray, grad: np.ndarray, lr: float):
        """Update the flat params in place from grad (clobbered) at learning rate lr."""
        k = self._scalars(lr)
        for block, states, s in self._blocks:
            self._update(params[block], grad[block], s, states, k)
        self.t += 1

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The live flat state arrays by name (writing into them changes the state)."""
        return dict(self.state)

    def state_scalars(self) -> dict[str, int]:
        """The scalar state: steps taken."""
        return {"t": self.t}

    def full_state(self, comm) -> dict[str, np.ndarray]:
        """The state arrays over the whole vector: all of them live here (zero.ShardedOptimizer gathers)."""
        return self.state_arrays()

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, int]):
        """Copy saved state in, after checking names and shapes."""
        _require(set(arrays) == set(self.state),
                 f"{self.name} state arrays are {sorted(self.state)}, got {sorted(arrays)}")
        for k, a in arrays.items():
            a = np.asarray(a)
            _require(a.shape == (self.n,) and a.dtype.kind == "f",
                     f"{self.name} state '{k}' is {a.dtype}{a.shape}, expected a float vector "
                     f"of shape ({self.n},) (one entry per parameter)")
        _require(set(scalars) == {"t"} and int(scalars["t"]) == scalars["t"] >= 0,
                 f"{self.name} state scalars must be {{'t': steps taken >= 0}}, got {scalars}")
        for k, a in arrays.items():
            np.copyto(self.state[k], a, casting="same_kind")
        self.t = int(scalars["t"])

    def _scalars(self, lr: float) -> tuple:
        """Per-step constants of the update, in the params' dtype."""
        raise NotImplementedError

    def _update(self, p, g, s, states, k):
        """The update on one block: p, g, scratch s, state views, constants k."""
        raise NotImplementedError


class SGD(Optimizer):
    """torch.optim.SGD: momentum (buf = g on the first step), dampening, Nesterov, L2."""

    name = "sgd"

    def __init__(self, n: int, dtype, *, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        _unit("momentum", momentum)
        _unit("dampening", dampening, closed=True)
        _require(weight_decay >= 0, f"optim.weight_decay={weight_decay} must be >= 0")
        _require(not nesterov or (momentum > 0 and dampening == 0),
                 f"optim.nesterov=true needs optim.momentum > 0 (got {momentum}) and optim.dampening=0 "
                 f"(got {dampening})")
        super().__init__(n, dtype, ("momentum_buffer",) if momentum else ())
        self.momentum, self.dampening = momentum, dampening
        self.nesterov, self.weight_decay = nesterov, weight_decay

    def _scalars(self, lr):
        f = self.dtype.type
        return f(lr), f(self.weight_decay), f(self.momentum), f(1 - self.dampening), self.t == 0

    def _update(self, p, g, s, states, k):
        lr, wd, mu, keep, first = k
        if wd:
            np.multiply(p, wd, out=s)
            g += s                              # g += wd p
        if mu:
            (buf,) = states
            if first:
                np.copyto(buf, g)               # buf = g
            else:
                buf *= mu
                if keep != 1:
                    g *= keep
                buf += g                        # buf = mu buf + (1 - dampening) g
            if self.nesterov:
                np.multiply(buf, mu, out=s)
                g += s                          # g += mu buf
            else:
                g = buf
        np.multiply(g, lr, out=s)
        p -= s                                  # p -= lr g


class Adam(Optimizer):
    """torch.optim.Adam: bias-corrected moments, weight decay as L2 added to the gradient."""

    name = "adam"
    decoupled = False

    def __init__(self, n: int, dtype, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        beta1, beta2 = betas
        _unit("beta1", beta1)
        _unit("beta2", beta2)
        _require(eps > 0, f"optim.eps={eps} must be > 0, e.g. 1e-8")
        _require(weight_decay >= 0, f"optim.weight_decay={weight_decay} must be >= 0")
        super().__init__(n, dtype, ("exp_avg", "exp_avg_sq"))
        self.betas, self.eps, self.weight_decay = (beta1, beta2), eps, weight_decay

    def _scalars(self, lr):
        f, (beta1, beta2), t = self.dtype.type, self.betas, self.t + 1
        bc1, bc2_sqrt = 1 - beta1**t, math.sqrt(1 - beta2**t)
        decoupled = self.decoupled and self.weight_decay
        decay = f(1 - lr * self.weight_decay) if decoupled else None
        l2 = 0.0 if self.decoupled else self.weight_decay
        return (f(1 - beta1), f(beta2), f(1 - beta2), f(self.eps * bc2_sqrt),
                f(lr * bc2_sqrt / bc1), f(l2), decay)

    def _update(self, p, g, s, states, k):
        m, v = states
        one_m_beta1, beta2, one_m_beta2, eps_hat, step_size, l2, decay = k
        if decay is not None:
            p *= decay                          # AdamW: p *= 1 - lr wd
        if l2:
            np.multiply(p, l2, out=s)
            g += s                              # g += wd p
        np.subtract(g, m, out=s)
        s *= one_m_beta1
        m += s                                  # m = lerp(m, g, 1 - beta1)
        v *= beta2
        g *= g
        g *= one_m_beta2
        v += g                                  # v = beta2 v + (1 - beta2) g^2
        np.sqrt(v, out=s)
        s += eps_hat
        np.divide(m, s, out=s)
        s *= step_size
        p -= s                                  # p -= step_size m / (sqrt(v) + eps_hat)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay p *= 1 - lr*wd (default 0.01)."""

    name = "adamw"
    decoupled = True

    def __init__(self, n: int, dtype, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(n, dtype, betas=betas, eps=eps, weight_decay=weight_decay)


class RMSprop(Optimizer):
    """torch.optim.RMSprop: squared-gradient average, optional momentum and centering, L2."""

    name = "rmsprop"

    def __init__(self, n: int, dtype, *, alpha: float = 0.99, eps: float = 1e-8,
                 momentum: float = 0.0, weight_decay: float = 0.0, centered: bool = False):
        _unit("alpha", alpha)
        _unit("momentum", momentum)
        _require(eps > 0, f"optim.eps={eps} must be > 0, e.g. 1e-8")
        _require(weight_decay >= 0, f"optim.weight_decay={weight_decay} must be >= 0")
        names = ("square_avg",) + ("momentum_buffer",) * bool(momentum) + ("grad_avg",) * bool(centered)
        super().__init__(n, dtype, names)
        self.alpha, self.eps, self.momentum = alpha, eps, momentum
        self.weight_decay, self.centered = weight_decay, centered

    def _scalars(self, lr):
        f = self.dtype.type
        return f(lr), f(self.alpha), f(1 - self.alpha), f(self.eps), f(self.momentum), f(self.weight_decay)

    def _update(self, p, g, s, states, k):
        lr, alpha, one_m_alpha, eps, mu, wd = k
        v, *rest = states
        if wd:
            np.multiply(p, wd, out=s)
            g += s                              # g += wd p
        v *= alpha
        np.multiply(g, g, out=s)
        s *= one_m_alpha
        v += s                                  # v = alpha v + (1 - alpha) g^2
        if self.centered:
            g_avg = rest[-1]
            np.subtract(g, g_avg, out=s)
            s *= one_m_alpha
            g_avg += s                          # g_avg = lerp(g_avg, g, 1 - alpha)
            np.multiply(g_avg, g_avg, out=s)
            np.subtract(v, s, out=s)
            np.sqrt(s, out=s)                   # sqrt(v - g_avg^2)
        else:
            np.sqrt(v, out=s)
        s += eps
        np.divide(g, s, out=s)                  # g / (avg + eps)
        if mu:
            buf = rest[0]
            buf *= mu
            buf += s                            # buf = mu buf + g / (avg + eps)
            np.multiply(buf, lr, out=s)
        else:
            s *= lr
        p -= s


OPTIMIZERS: dict[str, type[Optimizer]] = {c.name: c for c in (SGD, Adam, AdamW, RMSprop)}


def defaults(name: str) -> dict[str, object]:
    """The named optimizer's keyword options with its own defaults, e.g. AdamW's weight_decay 0.01."""
    params = inspect.signature(OPTIMIZERS[name]).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


def make_optimizer(name: str, n: int, dtype, **options) -> Optimizer:
    """The named optimizer for n parameters from the options it takes; others, and None values, are ignored.

    A config carries one set of options for all optimizers, so momentum reaches SGD and RMSprop
    only, and weight_decay=None leaves each optimizer its own default (0.01 for AdamW).
    """
    _require(name in OPTIMIZERS, f"optim.name={name!r} is not one of {', '.join(OPTIMIZERS)}")
    own = defaults(name)
    return OPTIMIZERS[name](n, dtype, **{k: v for k, v in options.items() if k in own and v is not None})
