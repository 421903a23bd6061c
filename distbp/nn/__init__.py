"""NumPy backprop core: layers, losses, initialisation and the Sequential model."""

from . import conv, init, layers, losses, norm, pool, reshape  # conv, norm, pool, reshape register their layers
from .layers import LAYER_TYPES, Context, Layer, WeightLayer, activation_names, register
from .losses import MSE, BCEWithLogits, SoftmaxCrossEntropy, make_loss
from .model import Sequential, mlp_specs

__all__ = ["LAYER_TYPES", "Context", "Layer", "WeightLayer", "activation_names", "register", "Sequential",
           "mlp_specs", "SoftmaxCrossEntropy", "MSE", "BCEWithLogits", "make_loss", "conv", "init", "layers",
           "losses", "norm", "reshape"]
