"""Winograd's minimal filtering F(m x m, r x r) for an r x r, stride-1 convolution (Lavin and Gray, 2016):
F(4x4, 3x3) and F(4x4, 5x5) (FORMS).

An m x m block of outputs is Y = A^T [U . V] A with U = G g G^T (the r x r kernel g of one input and one
output channel, transformed to a x a, a = m + r - 1) and V = B^T d B (the a x a input tile d under the
block, from the zero-padded input, tiles m apart), . the element-wise product. Summed over input channels,
each of the a*a positions of the tile is one product, M[k] = U[k] (F, C) @ V[k] (C, tiles): a*a
multiply-adds per channel pair and m*m outputs where the direct convolution takes m*m*r*r (3x3: 36
for 144, 4x fewer; 5x5: 64 for 400, 6.25x fewer). The matrices are made from the interpolation points
by Toom-Cook (see matrices): for 3x3 they are Lavin and Gray's.

Backward differentiates the same formula. With Z = A dY A^T (dY the m x m block of output gradients),
dW = G^T S G with S[k] = sum over tiles of Z[k] (F, tiles) @ V[k]^T (tiles, C), fewer again by the same
factor; dx is the forward of dy (zero-padded by r - 1 - padding) with the kernel flipped and transposed,
as Conv2D's direct path computes it. In exact arithmetic all three equal the direct convolution; in
floating point they round differently: B and A hold integers (up to 8 for 3x3, 21 for 5x5), G fractions
(applied in float64, rounded once), and the error in float32 is up to some 20x the direct sum's, under
3e-5 of the largest output (measured against float64 in tests/test_winograd.py, which also compares
with torch). Conv2D takes this path in float32 only.

The transforms are compiled kernels (rows then columns of each tile, one pass over the samples
per nonzero matrix entry, in a fixed order). They read the unpadded input (C, H, W, N), a conv
stack's activations where they lie: the padding's terms are left out, as the zeros they would add,
so no padded copy is made (nor one of dy for dx, or for the last tiles of dW). The work items of
the rank's threads (nn/threads.py) are tile rows (m output rows each), cut into blocks of tiles of
at most BLOCK_BYTES: a thread transforms a block into a (a*a, C, tiles) buffer, multiplies it on
its own single-thread sgemm and transforms the product back into y. dW keeps one partial S per
group of tile rows, added in row order. So the bits do not depend on the thread count; on the
shapes (tiles per block, batch) they do, as every BLAS product's, which is why deterministic mode
keeps the micro-batch size fixed.
"""

import functools
import math
from fractions import Fraction

import numpy as np

from . import threads
from .kernels import compiled

# F(m x m, r x r) per kernel size r: m, the outputs of a tile per side, and the interpolation points besides infinity
# (m + r - 2 of them); a tile of input is a = m + r - 1 wide. The matrices follow from them (see matrices).
FORMS = {3: (4, (0, 1, -1, 2, -2)), 5: (4, (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2)))}
BLOCK_BYTES = 1 << 22  # a block's transformed tiles (input or output), at most: measured, docs/PERFORMANCE.md
PARTS_BYTES = 1 << 23  # dW's partial S per group of tile rows, at most this many bytes in all


def _inverse(V: list) -> list:
    """The inverse of a square matrix of Fractions (Gauss-Jordan, exact)."""
    n = len(V)
    R = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(V)]
    for c in range(n):
        p = next(i for i in range(c, n) if R[i][c])
        R[c], R[p] = R[p], [v / R[p][c] for v in R[p]]
        for i in range(n):
            if i != c and R[i][c]:
                R[i] = [u - R[i][c] * v for u, v in zip(R[i], R[c])]
    return [row[n:] for row in R]


def _primitive(v: list) -> Fraction:
    """The factor that makes a vector of Fractions the smallest integers, its first nonzero entry positive."""
    s = Fraction(math.lcm(*(x.denominator for x in v)), math.gcd(*(x.numerator for x in v)))
    return s if next(x for x in v if x) > 0 else -s


@functools.cache
def matrices(r: int) -> tuple:
    """A^T (m, a), G (a, r) and B^T (a, a) of FORMS[r] as float64 arrays (Toom-Cook): with the points p_j and
    infinity, G's rows evaluate the kernel (p_j^k; infinity: its last entry), A^T's columns the outputs (p_j^i), and
    B^T = V^-T for V the (a, a) Vandermonde matrix of the points (infinity: the leading coefficient). Each position
    j's factors are moved into G so that A^T's column j and B^T's row j are the smallest integers."""
    m, points = FORMS[r]
    a, p = m + r - 1, [Fraction(x) for x in points]
    V = [[x**k for k in range(a)] for x in p] + [[Fraction(int(k == a - 1)) for k in range(a)]]
    Vi = _inverse(V)
    BT = [[Vi[k][j] for k in range(a)] for j in range(a)]
    AT = [[x**i for x in p] + [Fraction(int(i == m - 1))] for i in range(m)]
    G = [[x**k for k in range(r)] for x in p] + [[Fraction(int(k == r - 1)) for k in range(r)]]
    for j in range(a):
        s, t = _primitive([row[j] for row in AT]), _primitive(BT[j])
        for row in AT:
            row[j] *= s
        BT[j] = [v * t for v in BT[j]]
        G[j] = [v / (s * t) for v in G[j]]
    return tuple(np.array(M, dtype=np.float64) for M in (AT, G, BT))


def _terms(T, dtype):
    """The nonzero entries of each row of T (rows, k) as the kernels take them: I (rows, k) their columns, K their
    values in dtype, count (rows,) how many; the rows padded with column I[., 0] and value 0 (never read)."""
    I, K = np.zeros(T.shape, np.int64), np.zeros(T.shape, dtype)
    count = np.count_nonzero(T, axis=1).astype(np.int64)
    for u, row in enumerate(T):
        cols = np.flatnonzero(row)
        I[u], I[u, : len(cols)], K[u, : len(cols)] = cols[0], cols, row[cols]
    return I, K, count


@functools.cache
def _tables(r: int, dtype):
    """The terms (see _terms) of B^T, A^T and A of FORMS[r] in dtype (made once per form and type)."""
    AT, _, BT = matrices(r)
    return _terms(BT, dtype), _terms(AT, dtype), _terms(AT.T, dtype)


def tiles(Ho: int, Wo: int, r: int) -> tuple:
    """Tile rows and tiles per row of an (Ho, Wo) output of an r x r kernel."""
    m = FORMS[r][0]
    return -(-Ho // m), -(-Wo // m)


def _tile_block(bytes_per_tile: int, Tw: int) -> int:
    """Tiles per block of a tile row: the fewest blocks of near-equal size whose transformed tiles stay within
    BLOCK_BYTES (in cache between the transform, the products and the transform back), at least 1."""
    blocks = -(-Tw // max(1, BLOCK_BYTES // bytes_per_tile))
    return -(-Tw // blocks)


def kernel_transform(W):
    """U (a*a, F, C) = G W[f, c] G^T of a (F, C, r, r) kernel (computed in float64, rounded once to W's type),
    position a u + l of the a x a tile."""
    G = matrices(W.shape[-1])[1]
    U = np.matmul(np.matmul(G, W.astype(np.float64)), G.T)  # (F, C, a, a)
    return np.ascontiguousarray(U.reshape(*W.shape[:2], -1).transpose(2, 0, 1), dtype=W.dtype)


def correlate(x, U, r: int, Ho: int, Wo: int, top: int, left: int, b=None, relu: bool = False):
    """y (F, Ho, Wo*N) = the r x r correlation of x (C, H, W, N) zero-padded by top rows and left columns (and
    past its ends: zeros; see to_tiles), with the kernel whose transform is U (a*a, F, C), plus b, rectified if
    relu."""
    (C, _, _, N), (A, F, _), m = x.shape, U.shape, FORMS[r][0]
    (Th, Tw), (Bt, At, _), a = tiles(Ho, Wo, r), _tables(r, x.dtype), m + r - 1
    y = np.empty((F, Ho, Wo * N), x.dtype)
    bias = b if b is not None else np.zeros(F, x.dtype)
    tb = _tile_block(A * max(C, F) * N * x.itemsize, Tw)

    def rows(lo, hi):
        E, V = np.empty((a, m * tb + r - 1, N), x.dtype), np.empty((A, C, tb * N), x.dtype)
        S, M = np.empty((m, a, tb, N), x.dtype), np.empty((A, F, tb * N), x.dtype)
        for i in range(lo, hi):
            for t0 in range(0, Tw, tb):
                n = min(Tw - t0, tb)
                Vb, Mb = V[..., : n * N], M[..., : n * N]
                to_tiles(x, m * i, t0, top, left, *Bt, m, E[:, : m * n + r - 1], Vb.reshape(A, C, n, N))
                np.matmul(U, Vb, out=Mb)
                from_tiles(Mb.reshape(A, F, n, N), m * i, t0, *At, bias, relu, S[:, :, :n], y.reshape(F, Ho, Wo, N))

    threads.run(rows, Th, y.size)
    return y


def kernel_gradient(x, dy, r: int, Ho: int, Wo: int, top: int, left: int):
    """dW (F, C, r, r) of the correlation of x (C, H, W, N) padded by top and left (as correlate gets it) from dy
    (F, Ho, Wo*N): G^T S G, S[k] the sum over tile rows of Z[k] @ V[k]^T, kept in one partial per group of tile
    rows added in row order."""
    (C, _, _, N), F, m = x.shape, dy.shape[0], FORMS[r][0]
    (Th, Tw), (Bt, _, A), a = tiles(Ho, Wo, r), _tables(r, x.dtype), m + r - 1
    per = -(-Th // max(1, min(Th, PARTS_BYTES // (a * a * F * C * dy.itemsize))))  # tile rows per partial
    parts = np.zeros((-(-Th // per), a * a, F, C), dy.dtype)
    g = dy.reshape(F, Ho, Wo, N)  # the tiles past the last row or column read zeros
    tb = _tile_block(a * a * max(C, F) * N * x.itemsize, Tw)

    def groups(lo, hi):
        E, V = np.empty((a, m * tb + r - 1, N), x.dtype), np.empty((a * a, C, tb * N), x.dtype)
        P, Z = np.empty((a, m * tb, N), x.dtype), np.empty((a * a, F, tb * N), x.dtype)
        S = np.empty((a * a, F, C), x.dtype)
        for i in range(lo * per, min(hi * per, Th)):
            for t0 in range(0, Tw, tb):
                n = min(Tw - t0, tb)
                Vb, Zb = V[..., : n * N], Z[..., : n * N]
                to_tiles(x, m * i, t0, top, left, *Bt, m, E[:, : m * n + r - 1], Vb.reshape(a * a, C, n, N))
                to_tiles(g, m * i, t0, 0, 0, *A, m, P[:, : m * n], Zb.reshape(a * a, F, n, N))
                parts[i // per] += np.matmul(Zb, Vb.transpose(0, 2, 1), out=S)

    threads.run(groups, len(parts), x.size)
    S = parts.sum(axis=0).reshape(a, a, F, C)  # the partials in a fixed order whatever thread made them
    G = matrices(r)[1]
    return np.matmul(np.matmul(G.T, S.transpose(2, 3, 0, 1)), G).astype(dy.dtype)  # (F, C, r, r), in float64


@compiled
def to_tiles(src, r0, t0, top, left, I, K, count, step, E, out):
    """out (a*a, C, tb, N) = T D T^T for tiles t0 .. t0 + tb - 1 of rows r0 .. r0 + k - 1 of src (C, H, W, N)
    zero-padded by top rows and left columns (either may be negative: rows and columns cut off) and past its
    ends as far as the tiles reach, tile t being D = padded[c, r0 : r0 + k, step t : step t + k] and T (a, k)
    given by its terms (see _terms): B^T d B of an input tile (k = a, step m) or A dY A^T of an output
    gradient's (k = step = m). The padding is never copied: its terms are left out (each would add a zero).
    Per channel, the rows first into E (a, step tb + k - step, N), then the columns; each term one pass over
    the samples, added in column order."""
    a, w0, N = I.shape[0], step * t0 - left, out.shape[3]
    H, W = src.shape[1], src.shape[2]
    for c in range(out.shape[1]):
        for u in range(a):
            e = E[u]
            w1, w2 = max(0, -w0), min(e.shape[0], W - w0)  # the columns of e inside src
            first = True
            for j in range(count[u]):
                h = r0 + I[u, j] - top
                if h < 0 or h >= H:
                    continue
                x, k = src[c, h], K[u, j]
                if first:
                    first = False
                    for w in range(w1, w2):
                        for n in range(N):
                            e[w, n] = k * x[w0 + w, n]
                else:
                    for w in range(w1, w2):
                        for n in range(N):
                            e[w, n] += k * x[w0 + w, n]
            for w in range(e.shape[0]):
                if first or w < w1 or w >= w2:
                    for n in range(N):
                        e[w, n] = 0
        for u in range(a):
            e = E[u]
            for l in range(a):
                o = out[a * u + l, c]
                for j in range(count[l]):
                    v, k = I[l, j], K[l, j]
                    for t in range(o.shape[0]):
                        if j == 0:
                            for n in range(N):
                                o[t, n] = k * e[step * t + v, n]
                        else:
                            for n in range(N):
                                o[t, n] += k * e[step * t + v, n]


@compiled
def from_tiles(M, r0, t0, I, K, count, b, relu, S, y):
    """Rows r0 .. r0 + m - 1, tiles t0 .. t0 + tb - 1 of y (F, Ho, Wo, N) = A^T M A (+ b[f], then np.maximum(., 0)
    if relu) for M (a*a, F, tb, N), A^T (m, a) given by its terms (see _terms): per channel, the rows first into
    S (m, a, tb, N), then the columns, as to_tiles; outputs past Ho or Wo are dropped."""
    m, a, Ho, Wo = S.shape[0], S.shape[1], y.shape[1], y.shape[2]
    for f in range(M.shape[1]):
        for h in range(m):
            for l in range(a):
                for t in range(M.shape[2]):
                    o, x, k = S[h, l, t], M[a * I[h, 0] + l, f, t], K[h, 0]
                    for n in range(o.shape[0]):
                        o[n] = k * x[n]
                    for j in range(1, count[h]):
                        x, k = M[a * I[h, j] + l, f, t], K[h, j]
                        for n in range(o.shape[0]):
                            o[n] += k * x[n]
        bf = b[f]
        for h in range(min(m, Ho - r0)):
            for t in range(M.shape[2]):
                for i in range(min(m, Wo - m * (t0 + t))):
                    o, x, k = y[f, r0 + h, m * (t0 + t) + i], S[h, I[i, 0], t], K[i, 0]
                    for n in range(o.shape[0]):
                        o[n] = k * x[n]
                    for j in range(1, count[i]):
                        x, k = S[h, I[i, j], t], K[i, j]
                        for n in range(o.shape[0]):
                            o[n] += k * x[n]
                    for n in range(o.shape[0]):
                        v = o[n] + bf
                        o[n] = (v if v > 0 or v != v else 0) if relu else v
