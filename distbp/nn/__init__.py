"""NumPy backprop core: layers, losses, initialisation and the Sequential model."""

import importlib.util

from . import init, layers, losses
from .layers import LAYER_TYPES, Context, Layer, register
from .losses import MSE, BCEWithLogits, SoftmaxCrossEntropy, make_loss
from .model import Sequential, mlp_specs

# Convolution, normalisation and reshape layers register themselves on import.
for _name in ("conv", "norm", "reshape"):
    if importlib.util.find_spec(f"{__name__}.{_name}") is not None:
        importlib.import_module(f"{__name__}.{_name}")

__all__ = ["LAYER_TYPES", "Context", "Layer", "register", "Sequential", "mlp_specs",
           "SoftmaxCrossEntropy", "MSE", "BCEWithLogits", "make_loss", "init", "layers", "losses"]
