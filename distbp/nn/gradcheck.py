"""Finite-difference checks of a layer's backward: dx and the parameter gradients, in float64."""
from __future__ import annotations

import numpy as np


def numeric_grad(f, a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar f() w.r.t. every entry of a (restored after)."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        orig = a[i]
        a[i] = orig + eps
        up = f()
        a[i] = orig - eps
        down = f()
        a[i] = orig
        g[i] = (up - down) / (2 * eps)
    return g


def rel_err(a, b) -> float:
    """||a - b|| / max(||a||, ||b||) (0 when both are 0)."""
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else 0.0


def _bind_random(layer, rng: np.random.Generator) -> tuple[dict, dict]:
    """Bind random float64 parameters and zero gradients to the layer; return (params, grads)."""
    params = {n: 0.5 * rng.standard_normal(s) for n, s in layer.param_shapes()}
    grads = {n: np.zeros(s) for n, s in layer.param_shapes()}
    layer.bind(params, grads)
    return params, grads


def check_gradients(layer, x, *, params: dict | None = None, grads: dict | None = None,
                    rng: np.random.Generator | None = None, tol: float = 1e-6, eps: float = 1e-6) -> float:
    """Max relative error of backward's dx and parameter gradients against central differences of
    sum(forward(x) * R), R random; AssertionError naming the worst one if it is above tol.

    x is a float64 batch of shape (N, *in_shape). Without params/grads (dicts of float64 arrays the
    layer is bound to), random parameters are bound. Also checks the contract: forward leaves x
    alone, backward leaves dy alone and returns dx shaped like x.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    x = np.array(x, dtype=np.float64)
    if params is None:
        params, grads = _bind_random(layer, rng)
    R = rng.standard_normal((x.shape[0], *layer.out_shape))
    for g in grads.values():
        g[...] = 0
    x0, R0 = x.copy(), R.copy()
    y = layer.forward(x)
    assert y.shape == R.shape, f"{type(layer).__name__}.forward returned shape {y.shape}, out_shape says {R.shape}"
    dx = layer.backward(R)
    assert dx is not None and dx.shape == x.shape and dx.dtype == x.dtype, \
        f"{type(layer).__name__}.backward returned {None if dx is None else (dx.shape, dx.dtype)}, " \
        f"not dx of shape {x.shape} and dtype {x.dtype}"
    assert np.array_equal(x, x0), f"{type(layer).__name__}.forward changed its input x (overwrite_x is off)"
    assert np.array_equal(R, R0), f"{type(layer).__name__}.backward changed its input dy (overwrite_dy is off)"

    def loss():
        return float(np.sum(layer.forward(x) * R))
    errors = {"dx": rel_err(dx, numeric_grad(loss, x, eps))}
    errors.update({f"d{name}": rel_err(grads[name], numeric_grad(loss, p, eps)) for name, p in params.items()})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, (f"{type(layer).__name__}: {worst} differs from finite differences by "
                                  f"{errors[worst]:.3g} (relative) > tol {tol:g}; all: "
                                  + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
    return errors[worst]
