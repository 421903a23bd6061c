"""Layers, losses and the Sequential model (NumPy), and the pieces for writing your own layer or loss.

Public: the names in ``__all__`` (docs/API.md); the submodules and other names are internal.
"""

from . import blocks, conv, init, layers, losses, norm, pool, reshape  # noqa: F401  (blocks, conv, norm, pool, reshape register)
from .blocks import Block, Chain, Concat, Fork, Residual
from .conv import Conv2D
from .gradcheck import check_gradients
from .layers import (GELU, LAYER_TYPES, Activation, Context, Dropout, Layer, LeakyReLU, Linear,  # noqa: F401
                     ReLU, Sigmoid, Softplus, Tanh, WeightLayer, activation_names, check_spec, register,
                     spec_value)
from .losses import MSE, BCEWithLogits, Loss, SoftmaxCrossEntropy, make_loss, register_loss  # noqa: F401
from .model import Sequential, mlp_specs  # noqa: F401
from .resnet import resnet_specs
from .norm import BatchNorm, LayerNorm
from .pool import AvgPool2D, GlobalAvgPool, MaxPool2D
from .reshape import Flatten, Reshape

__all__ = ["Sequential", "Layer", "WeightLayer", "Activation", "Context", "register", "check_spec", "spec_value",
           "Block", "Fork", "Chain", "Residual", "Concat",
           "Linear", "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool", "BatchNorm", "LayerNorm", "Flatten",
           "Reshape", "Dropout", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "GELU", "Softplus",
           "Loss", "register_loss", "SoftmaxCrossEntropy", "MSE", "BCEWithLogits", "check_gradients", "resnet_specs"]
