"""Training-time augmentation of image batches: random crop (of the zero-padded image) and horizontal flip.

Each row's crop offset and flip come from counter-based bits of (seed, epoch, the row's index in the
split) alone, so a row is augmented the same way on whichever rank reads it and after a resume at any
rank count (no generator state to save). Inputs are normalized first, so the padding is the mean.
"""

import numpy as np

from ..errors import UserError
from ..nn.counter_rng import dropout_bits

KINDS = ("none", "crop_flip")
PAD = 4  # pixels on each side, as He et al. (2016) on CIFAR-10


def crop_flip(x: np.ndarray, seed: int, epoch: int, rows: np.ndarray, pad: int = PAD) -> np.ndarray:
    """x (N, C, H, W) with each row cropped from its zero-padded (H + 2 pad, W + 2 pad) image and flipped
    left-right with probability 1/2, both drawn from (seed, epoch, rows[i])."""
    N, _, H, W = x.shape
    bits = dropout_bits(seed, epoch, "augment.crop_flip", rows, 3)  # (N, 3)
    top, left = (bits[:, :2] % np.uint64(2 * pad + 1)).astype(np.int64).T
    flip = (bits[:, 2] >> np.uint64(63)).astype(bool)
    padded = np.zeros((N, x.shape[1], H + 2 * pad, W + 2 * pad), x.dtype)
    padded[:, :, pad:pad + H, pad:pad + W] = x
    out = np.empty_like(x)
    for i in range(N):
        window = padded[i, :, top[i]:top[i] + H, left[i]:left[i] + W]
        out[i] = window[:, :, ::-1] if flip[i] else window
    return out


def augmenter(kind: str, input_shape: tuple, path: str):
    """The augmentation function of data.augment for inputs of input_shape, or None; UserError if it cannot apply."""
    if kind == "none":
        return None
    if len(input_shape) != 3:
        raise UserError(f'data.augment="{kind}" needs image inputs (C, H, W) but {path} has inputs '
                        f'{tuple(input_shape)}: set data.augment="none"')
    return crop_flip
