"""The compiled passes (nn/kernels.py) give the bits of the NumPy calls they replace, on awkward values too."""
import os
import subprocess
import sys

import numpy as np
import pytest

from distbp.nn import kernels

pytestmark = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NumPy's NaN arithmetic
DTYPES = (np.float32, np.float64)


def awkward(shape, dtype, seed=0):
    """Random values with -0.0, 0.0, NaN, +-inf, subnormals and exact ties sprinkled in."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(dtype)
    tiny = np.finfo(dtype).smallest_subnormal
    specials = np.array([-0.0, 0.0, np.nan, np.inf, -np.inf, tiny, -tiny, 1.0, 1.0], dtype)
    flat = a.reshape(-1)
    where = rng.choice(flat.size, flat.size // 4, replace=False)
    flat[where] = rng.choice(specials, where.size)
    return a


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def numpy_maxpool2(x):
    """The tournament the kernel replaced: np.maximum of each pair, then of the winners; masks as before."""
    Ho, Wo = x.shape[1] // 2, x.shape[2] // 2
    q = x[:, : 2 * Ho, : 2 * Wo].reshape(x.shape[0], Ho, 2, Wo, 2, x.shape[-1])
    a, b, c, d = q[:, :, 0, :, 0], q[:, :, 0, :, 1], q[:, :, 1, :, 0], q[:, :, 1, :, 1]
    top, bottom = np.maximum(a, b), np.maximum(c, d)
    code = np.where(top >= bottom, (b > a).astype(np.uint8), 2 + (d > c).astype(np.uint8))
    return np.maximum(top, bottom), code.astype(np.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hw", [(4, 6), (5, 7)])  # odd sizes: the last row and column belong to no window
def test_maxpool2_forward_and_backward_give_numpys_bits(dtype, hw):
    x = awkward((3, *hw, 5), dtype)
    x[0, :2, :2] = np.array([-0.0, 0.0], dtype)[:, None, None]  # a window of signed zeros: np.maximum's choice
    C, (H, W), N = x.shape[0], hw, x.shape[-1]
    y, code = np.empty((C, H // 2, W // 2, N), dtype), np.empty((C, H // 2, W // 2, N), np.uint8)
    kernels.maxpool2_forward(x, y, code, 0, C)
    want_y, want_code = numpy_maxpool2(x)
    assert same_bits(y, want_y) and same_bits(code, want_code)

    dy = awkward(y.shape, dtype, seed=1)
    dx = np.full(x.shape, 7, dtype)  # every element must be written
    kernels.maxpool2_backward(dy, code, dx, 0, C)
    want = np.zeros_like(x)
    for k in range(4):  # dy where the quarter won; 0.0 elsewhere (torch's max_pool2d_backward)
        want[:, k // 2 : 2 * (H // 2) : 2, k % 2 : 2 * (W // 2) : 2] = np.where(code == k, dy, 0)
    assert same_bits(dx, want)


def test_maxpool2_propagates_nan_like_torch():
    """A NaN anywhere in a window is its max (torch's value); which quarter gets dy is the tournament's, as before."""
    x = np.ones((1, 2, 2, 4), np.float32)
    x[0, 1, 1, 0] = x[0, 0, 0, 1] = np.nan
    x[0, 0, 1, 2] = 5
    y, code = np.empty((1, 1, 1, 4), np.float32), np.empty((1, 1, 1, 4), np.uint8)
    kernels.maxpool2_forward(x, y, code, 0, 1)
    assert np.isnan(y[0, 0, 0, :2]).all() and y[0, 0, 0, 2] == 5 and y[0, 0, 0, 3] == 1
    assert same_bits(code, numpy_maxpool2(x)[1]) and code[0, 0, 0, 2] == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_mask_gives_numpys_bits(dtype):
    dy, y = awkward((4, 300), dtype, 2), awkward((4, 300), dtype, 3)
    out = np.empty_like(dy)
    kernels.relu_mask(dy, y, out, 0, 4)
    assert same_bits(out, np.multiply(dy, y > 0))
    before = dy.copy()
    kernels.relu_mask(dy, y, dy, 1, 3)  # in place, rows 1 and 2 only
    assert same_bits(dy[1:3], out[1:3]) and same_bits(dy[[0, 3]], before[[0, 3]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
def test_scale_shift_gives_numpys_bits(dtype, relu):
    x, a, b = awkward((5, 300), dtype, 4), awkward((5,), dtype, 5), awkward((5,), dtype, 6)
    y = np.empty_like(x)
    kernels.scale_shift(x, a, b, relu, y, 0, 5)
    want = x * a[:, None]
    want += b[:, None]  # rounded after each operation, as BatchNorm's NumPy calls did
    if relu:
        np.maximum(want, np.zeros_like(want), out=want)
    assert same_bits(y, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_add_gives_numpys_bits(dtype):
    dy, x = awkward((3, 300), dtype, 7), awkward((3, 300), dtype, 8)
    g, k, c = (awkward((3,), dtype, s) for s in (9, 10, 11))
    out = np.empty_like(dy)
    kernels.scale_add(dy, g, x, k, c, out, 0, 3)
    want = dy * g[:, None]
    want += x * k[:, None]
    want += c[:, None]
    assert same_bits(out, want)


def test_the_compiled_kernel_and_its_python_loops_agree():
    """No fast-math: the compiled loops round like the interpreted ones, element by element."""
    dy, x = awkward((2, 40), np.float32, 12), awkward((2, 40), np.float32, 13)
    g, k, c = (awkward((2,), np.float32, s) for s in (14, 15, 16))
    compiled, interpreted = np.empty_like(dy), np.empty_like(dy)
    kernels.scale_add(dy, g, x, k, c, compiled, 0, 2)
    kernels.scale_add.py_func(dy, g, x, k, c, interpreted, 0, 2)
    assert same_bits(compiled, interpreted)


def test_a_damaged_cache_file_is_compiled_afresh_with_one_warning(tmp_path):
    """numba keeps no checksum of its cache: a garbled or truncated file means a warning and a fresh compile."""
    script = ("import numpy as np\nfrom distbp.nn import kernels\n"
              "a = np.arange(-3, 7, dtype=np.float32).reshape(2, 5); out = np.empty_like(a)\n"
              "kernels.relu_mask(a, a, out, 0, 2); kernels.relu_mask(a, a, out, 0, 2); print(out.sum())\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    run = lambda: subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    first = run()
    assert first.returncode == 0 and first.stdout.strip() == "21.0" and not first.stderr, first.stderr
    files = [f for f in tmp_path.rglob("*relu_mask*") if f.suffix in (".nbi", ".nbc")]
    assert files, list(tmp_path.rglob("*"))
    for damage in (lambda f: f.write_bytes(b"\x80\x05garbage" * 9), lambda f: f.write_bytes(b"")):
        for f in files:
            damage(f)
        again = run()
        assert again.returncode == 0 and again.stdout.strip() == "21.0", again.stderr
        assert again.stderr.count("could not be loaded or saved") == 1 and str(files[0].parent) in again.stderr, again.stderr


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts, bias, relu", [(2, True, True), (4, False, True), (1, True, False), (0, True, True),
                                               (2, False, False)])
def test_finish_row_gives_numpys_bits(dtype, parts, bias, relu):
    """A convolution's output row: y = part 0, y += part for the other kernel columns in order, y += b,
    np.maximum(y, 0)."""
    y, p, b = awkward((3, 4, 70), dtype, 17), awkward((parts, 3, 70), dtype, 18), awkward((3,), dtype, 19)
    want = y.copy()
    for k in range(parts):  # the row is the parts' sum; without parts it holds the product already
        if k == 0:
            want[:, 2] = p[0]
        else:
            want[:, 2] += p[k]
    if bias:
        want[:, 2] += b[:, None]
    if relu:
        np.maximum(want[:, 2], np.zeros_like(want[:, 2]), out=want[:, 2])
    kernels.finish_row(y, 2, p, b if bias else np.zeros(0, dtype), bias, relu)
    assert same_bits(y, want)  # row 2 finished, the other rows untouched
