"""distbp: data-parallel NumPy backpropagation over MPI with HDF5 datasets and checkpoints.

The public API (docs/API.md) is what ``__all__`` names here and in ``distbp.nn``; every other
module and name is internal and may change. The names load on first use, so importing one
internal module (say distbp.sampler) stays light.
"""
import importlib
import os

# OpenBLAS's idle worker threads spin for about 2**28 cycles (~0.1 s) after each threaded product before they
# sleep, taking the cores the rank's pass threads (distbp.nn.threads) need: W5's step at 2 threads ran 1.3x slower
# than at one. 2**4 cycles makes them sleep at once. OpenBLAS reads this when it loads, so it holds when distbp is
# imported before NumPy (the distbp command; docs/PERFORMANCE.md).
if not os.environ.get("OPENBLAS_THREAD_TIMEOUT"):
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"

__version__ = "0.1.0"

_HOME = {"Callback": "training.callbacks", "Config": "config", "ConfigError": "config", "load_config": "config", "Model": "api", "load": "api",
         "rank": "api", "train": "api", "world_size": "api", "NonFiniteError": "errors", "UserError": "errors"}

__all__ = sorted([*_HOME, "__version__", "nn"])


def __getattr__(name):
    """A public name, imported from its module on first use."""
    if name == "nn":
        return importlib.import_module("distbp.nn")
    if name not in _HOME:
        raise AttributeError(f"module 'distbp' has no attribute {name!r}")
    return getattr(importlib.import_module(f"distbp.{_HOME[name]}"), name)
