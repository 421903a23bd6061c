"""distbp lr-find: the suggestion on shaped curves, the sweep on the digits at 1 and 2 ranks, and digits-cnn's
old rate 0.05 caught on 28x28 images."""
import re

import h5py
import numpy as np
import pytest

from conftest import run_distbp
from distbp.datasets.dataset import digits_path, write_dataset
from distbp.errors import UserError
from distbp.training.lr_find import suggest, sweep_rates


def test_suggestion_is_a_third_of_the_lowest_point_before_divergence():
    rates = sweep_rates(1e-5, 1.0, 100)
    x = np.log10(rates)  # a valley with its floor at 1e-2, then a blow-up past 1e-1
    losses = 1 + (x + 2) ** 2 / 4 + np.where(x > -1, 10 ** (3 * (x + 1)) - 1, 0)
    got = suggest(rates, losses)
    assert 1e-2 <= got["min_loss_lr"] <= 2e-2  # the smoothing lags the raw floor by a few steps
    assert got["suggested_lr"] == pytest.approx(got["min_loss_lr"] / 3)
    assert 0.1 < got["diverged_at_lr"] < 1 and got["steps_used"] < 100
    nan = losses.copy()
    nan[90:] = np.nan
    assert suggest(rates, nan)["steps_used"] <= 90
    with pytest.raises(UserError, match="diverged after .* too few to suggest a rate; HINT: lower --start"):
        suggest(rates, np.r_[1.0, np.full(99, 100.0)])


def lr_find(tmp_path, *args, ranks=0):
    """distbp lr-find ARGS in tmp_path; (stdout, the suggested rate)."""
    proc = run_distbp(["lr-find", *args], ranks, cwd=tmp_path, timeout=150)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, re.search(r"suggested optim.lr = (\S+)", proc.stdout).group(1)


def test_digits_sweep_at_1_and_2_ranks_keeps_the_mlp_rate(comm, tmp_path):
    if comm.size > 1:
        pytest.skip("launches its own jobs: run in the serial session")
    args = ["--steps", "60", "--start", "1e-4", "--set", "train.deterministic=true", "--set", "train.micro_batch=16"]
    out, one = lr_find(tmp_path, *args, "-o", "one.png")
    assert "WARNING" not in out and (tmp_path / "one.png").stat().st_size > 0
    assert 0.01 < float(one) < 0.2  # the digits MLP trains well at its 0.05
    _, two = lr_find(tmp_path, *args, "-o", "two.png", ranks=2)
    assert one == two


def test_the_sweep_catches_digits_cnn_at_005_on_28x28_images(comm, tmp_path):
    if comm.size > 1:
        pytest.skip("launches its own jobs: run in the serial session")
    with h5py.File(digits_path()) as f:  # the digits, 8x8 -> 24x24 (nearest) padded to 28x28
        big = {k: (np.pad(np.kron(f[k]["x"][()].reshape(-1, 8, 8), np.ones((3, 3), np.uint8)),
                          ((0, 0), (2, 2), (2, 2)))[:, None], f[k]["y"][()]) for k in f}
    write_dataset(tmp_path / "d28.h5", big, "classification", 10, x_scale=1 / 16)
    out, lr = lr_find(tmp_path, "digits-cnn", "--set", "data.path='d28.h5'", "--set", "optim.lr=0.05",
                      "--steps", "100", "--start", "1e-4")
    assert re.search(r"WARNING: the config's optim.lr=0.05 is past where the loss diverged \(0\.0[1-4]", out), out
    assert float(lr) <= 0.01  # the shipped digits-cnn now trains at 0.01
