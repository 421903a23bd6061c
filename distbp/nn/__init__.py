"""Layers, losses and the Sequential model (NumPy), and the pieces for writing your own layer or loss.

Public: the names in ``__all__`` (docs/API.md); the submodules and other names are internal.
"""

from . import attention, blocks, conv, embedding, init, layers, losses, norm, pool, reshape, sequence_loss, transformer  # noqa: F401  (they register)
from .attention import CausalSelfAttention
from .blocks import Block, Chain, Concat, Fork, Residual
from .conv import Conv2D
from .embedding import Embedding, PositionEmbedding, TiedOutput
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
from .sequence_loss import SequenceCrossEntropy
from .transformer import TransformerBlock

__all__ = ["Sequential", "Layer", "WeightLayer", "Activation", "Context", "register", "check_spec", "spec_value",
           "Block", "Fork", "Chain", "Residual", "Concat",
           "Linear", "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool", "BatchNorm", "LayerNorm", "Flatten",
           "Reshape", "Dropout", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "GELU", "Softplus",
           "Embedding", "PositionEmbedding", "CausalSelfAttention", "TiedOutput", "TransformerBlock",
           "Loss", "register_loss", "SoftmaxCrossEntropy", "MSE", "BCEWithLogits", "SequenceCrossEntropy",
           "check_gradients", "resnet_specs"]
