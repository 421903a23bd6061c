"""distbp: data-parallel NumPy backpropagation over MPI with HDF5 datasets and checkpoints.

The public API (docs/API.md) is what ``__all__`` names here and in ``distbp.nn``; every other
module and name is internal and may change. The names load on first use, so importing one
internal module (say distbp.sampler) stays light.
"""
import importlib

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
