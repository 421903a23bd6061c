"""distbp: data-parallel NumPy backpropagation over MPI with HDF5 datasets and checkpoints.

The public API (docs/API.md) is what ``__all__`` names here and in ``distbp.nn``; every other
module and name is internal and may change.
"""
import sys
import types

__version__ = "0.1.0"

from . import nn  # noqa: E402
from .api import Model, load, rank, train, world_size  # noqa: E402
from .config import Config, ConfigError, load_config  # noqa: E402
from .errors import NonFiniteError, UserError  # noqa: E402

__all__ = ["Config", "ConfigError", "Model", "NonFiniteError", "UserError", "__version__", "load", "load_config",
           "nn", "rank", "train", "world_size"]


class _Package(types.ModuleType):
    """distbp itself: importing the internal module distbp.train keeps distbp.train the function."""

    def __setattr__(self, name, value):
        if not (name == "train" and isinstance(value, types.ModuleType)):  # the import system binds submodules
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
