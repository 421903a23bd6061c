"""data.augment="crop_flip": a crop of the padded image and a flip per row, from (seed, epoch, row) alone."""
import numpy as np
import pytest

from distbp.datasets.augment import PAD, augmenter, crop_flip
from distbp.errors import UserError


def windows(image, pad=PAD):
    """Every crop (and its flip) of the zero-padded image: {(top, left, flip): array}."""
    C, H, W = image.shape
    padded = np.zeros((C, H + 2 * pad, W + 2 * pad), image.dtype)
    padded[:, pad:pad + H, pad:pad + W] = image
    out = {}
    for t in range(2 * pad + 1):
        for l in range(2 * pad + 1):
            w = padded[:, t:t + H, l:l + W]
            out[(t, l, False)], out[(t, l, True)] = w, w[:, :, ::-1]
    return out


def test_each_row_is_one_crop_of_its_padded_image_possibly_flipped():
    x = np.arange(400 * 2 * 6 * 6, dtype=np.float32).reshape(400, 2, 6, 6) + 1  # no zeros: crops are unique
    out = crop_flip(x, seed=3, epoch=1, rows=np.arange(400))
    seen = []
    for i in range(len(x)):
        hits = [k for k, w in windows(x[i]).items() if np.array_equal(w, out[i])]
        assert len(hits) == 1, i
        seen.append(hits[0])
    tops, lefts, flips = zip(*seen)
    assert set(tops) == set(lefts) == set(range(2 * PAD + 1))  # every offset occurs
    assert 150 < sum(flips) < 250  # about half flipped


def test_a_row_gets_the_same_augmentation_on_any_rank_and_another_in_the_next_epoch():
    x = np.random.default_rng(0).standard_normal((24, 3, 8, 8))
    rows = np.random.default_rng(1).permutation(1000)[:24]
    whole = crop_flip(x, 0, 2, rows)
    for lo, hi in [(0, 7), (7, 20), (20, 24)]:  # one rank's slice of the batch
        assert np.array_equal(crop_flip(x[lo:hi], 0, 2, rows[lo:hi]), whole[lo:hi])
    assert not np.array_equal(crop_flip(x, 0, 3, rows), whole)
    assert not np.array_equal(crop_flip(x, 1, 2, rows), whole)


def test_augment_needs_images():
    assert augmenter("none", (64,), "d.h5") is None and augmenter("crop_flip", (3, 8, 8), "d.h5") is crop_flip
    with pytest.raises(UserError, match=r'data.augment="crop_flip" needs image inputs \(C, H, W\) but d.h5'):
        augmenter("crop_flip", (64,), "d.h5")
