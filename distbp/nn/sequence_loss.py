"""Cross-entropy of next-token logits (N, T, V) against token ids (N, T), as a loss over rows.

A row's loss is the mean over its T tokens, so the trainer's sum over rows divided by the global
row count is the mean over every token of the global batch (all rows have T tokens): exact at any
rank count, as torch's F.cross_entropy(logits.view(-1, V), y.view(-1)).
"""

import numpy as np

from .losses import Loss, SoftmaxCrossEntropy, register_loss


@register_loss("sequence_cross_entropy")
class SequenceCrossEntropy(Loss):
    """Softmax cross-entropy per token (log-sum-exp stable), averaged over each row's tokens."""

    def __init__(self):
        self.tokens = SoftmaxCrossEntropy()

    def forward(self, out: np.ndarray, y) -> float:
        """Sum over rows of the mean token loss: sum over all tokens / T."""
        n, T, V = out.shape                                     # (N, T, V)
        y = np.asarray(y)
        if y.shape != (n, T) or y.dtype.kind not in "iu":
            raise ValueError(f"sequence cross-entropy needs integer token ids of shape ({n}, {T}), "
                             f"got {y.dtype} {y.shape}")
        loss = self.tokens.forward(out.reshape(n * T, V), y.reshape(-1).astype(np.int64, copy=False)) / T
        dout = self.tokens.backward()
        dout /= T
        self.dout = dout.reshape(n, T, V)
        return loss

    def correct(self, out: np.ndarray, y) -> float:
        """Right next-token guesses / T summed over rows: the per-token accuracy times the rows."""
        right = np.count_nonzero(out.argmax(axis=-1) == np.asarray(y))
        return right / out.shape[1]
