"""A layer and a loss of your own: checked against finite differences, trained data-parallel, resumed.

    python examples/custom_layer.py [RUN_DIR]                 # one rank
    mpirun -n 4 python examples/custom_layer.py [RUN_DIR]     # four ranks, the same math

Nothing in distbp is edited: the layer and the loss register themselves by decorator. From a
TOML config, the same classes are `type = "custom_layer:Swish"` and `loss.name =
"custom_layer:SmoothCrossEntropy"` (with this file's folder current or on PYTHONPATH).
"""
import sys

import numpy as np

import distbp
from distbp import nn


@nn.register("swish")
class Swish(nn.Layer):
    """y = x * sigmoid(beta * x) with a trained beta per feature (starting at 1)."""

    private_output = private_dx = True  # forward and backward return fresh arrays

    def __init__(self, shape):
        self.out_shape = tuple(shape)

    @classmethod
    def build(cls, spec, in_shape, index, seed):
        """Build from {"type": "swish"} (no options)."""
        nn.check_spec(spec, index)
        return cls(in_shape)

    def param_shapes(self):
        """One parameter: beta, shaped like a row."""
        return [("beta", self.out_shape)]

    def bind(self, params, grads):
        """Keep the views of beta and its gradient: slices of the model's flat vectors."""
        self.beta, self.dbeta = params["beta"], grads["beta"]

    def init_params(self, rng):
        """beta = 1: the usual Swish (SiLU) at the start."""
        self.beta[...] = 1

    def forward(self, x):
        """Keeps x and s = sigmoid(beta x) for backward."""
        self.x = x                                              # (N, D)
        self.s = np.exp(-np.logaddexp(0, -self.beta * x))       # sigmoid without overflow
        return x * self.s

    def backward(self, dy):
        """dbeta += sum_rows dy x^2 s (1 - s); dx = dy (s + beta x s (1 - s))."""
        g = self.s * (1 - self.s) * self.x
        self.dbeta += np.sum(dy * g * self.x, axis=0)
        return dy * (self.s + self.beta * g)


@nn.register_loss("smooth_ce")
class SmoothCrossEntropy(nn.Loss):
    """Cross-entropy against smoothed labels: (1 - eps) one-hot + eps / classes, eps = 0.1."""

    eps = 0.1

    def forward(self, out, y):
        """Sum over rows of -sum_c q_c log softmax(out)_c; keeps d(sum)/d(out) = softmax - q."""
        n, c = out.shape
        q = np.full((n, c), self.eps / c)
        q[np.arange(n), y] += 1 - self.eps
        z = out - out.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        self.dout = (np.exp(log_p) - q).astype(out.dtype)
        return float(-(q * log_p).sum())

    def correct(self, out, y):
        """Rows whose largest output is the label."""
        return int(np.count_nonzero(out.argmax(axis=1) == y))


def main(run_dir: str) -> int:
    """Check the layer's gradients, train 3 epochs on the shipped digits, then resume to 5."""
    x = np.random.default_rng(0).standard_normal((4, 8))
    error = nn.check_gradients(Swish((8,)), x)                  # AssertionError if above 1e-6
    config = distbp.Config(
        model={"layers": [{"type": "linear", "out": 64}, {"type": "swish"}, {"type": "linear", "out": 10}]},
        loss={"name": "smooth_ce"},
        train={"epochs": 3},
        optim={"name": "adamw", "lr": 0.003},
    )
    first = distbp.train(config, run_dir=run_dir, resume="never", force=True)
    config.train.epochs = 5                                     # train further from the checkpoint
    second = distbp.train(config, run_dir=run_dir, resume="auto")
    if distbp.rank() == 0:
        print(f"Swish gradient check: max relative error {error:.2e}")
        print(f"{distbp.world_size()} rank(s): after {first['epochs']:g} epochs val_accuracy "
              f"{first['val_accuracy']:.4f}; resumed to {second['epochs']:g} epochs "
              f"({second['steps'] - first['steps']} more steps): val_accuracy {second['val_accuracy']:.4f}")
    return second["exit_code"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/custom_layer"))
