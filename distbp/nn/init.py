"""Weight initialisation schemes (He/Kaiming and Glorot/Xavier) drawn from a numpy Generator.

Conventions follow torch.nn.init with the default fan mode: He uses gain sqrt(2) on
fan_in, Glorot uses gain 1 on fan_in + fan_out. Each function returns a float64 array
of ``shape``; the caller writes it into its parameter view (casting to the model dtype).
"""

import numpy as np

RELU_FAMILY = frozenset({"relu", "leaky_relu", "gelu"})


def he_uniform(rng: np.random.Generator, fan_in: int, fan_out: int, shape: tuple) -> np.ndarray:
    """U(-a, a) with a = sqrt(6 / fan_in) (torch kaiming_uniform_, relu gain)."""
    bound = np.sqrt(6.0 / fan_in)
    return rng.uniform(-bound, bound, size=shape)


def he_normal(rng: np.random.Generator, fan_in: int, fan_out: int, shape: tuple) -> np.ndarray:
    """N(0, 2 / fan_in) (torch kaiming_normal_, relu gain)."""
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)


def glorot_uniform(rng: np.random.Generator, fan_in: int, fan_out: int, shape: tuple) -> np.ndarray:
    """U(-a, a) with a = sqrt(6 / (fan_in + fan_out)) (torch xavier_uniform_)."""
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape)


def glorot_normal(rng: np.random.Generator, fan_in: int, fan_out: int, shape: tuple) -> np.ndarray:
    """N(0, 2 / (fan_in + fan_out)) (torch xavier_normal_)."""
    return rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), size=shape)


INITS = {f.__name__: f for f in (he_uniform, he_normal, glorot_uniform, glorot_normal)}


def default_init(next_kind: str | None) -> str:
    """He normal before a relu-family activation, Glorot uniform otherwise (tanh, sigmoid, output)."""
    return "he_normal" if next_kind in RELU_FAMILY else "glorot_uniform"


def layer_rng(seed: int, index) -> np.random.Generator:
    """Generator for layer ``index`` (an int, or a sub-layer's key tuple (i, c, ...)) from (seed, index) alone."""
    return np.random.default_rng([int(seed), *(int(i) for i in np.atleast_1d(index))])
