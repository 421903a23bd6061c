"""Winograd's minimal filtering F(4x4, 3x3) for a 3x3, stride-1 convolution (Lavin and Gray, 2016).

A 4x4 block of outputs is Y = A^T [U . V] A with U = G g G^T (the 3x3 kernel g of one input and one
output channel, transformed to 6x6) and V = B^T d B (the 6x6 input tile d under the block, from the
padded input, tiles 4 apart), . the element-wise product. Summed over input channels, each of the
36 positions of the 6x6 tile is one product, M[k] = U[k] (F, C) @ V[k] (C, tiles): 36 multiply-adds
per channel pair and 16 outputs where the direct convolution takes 144 (4x fewer).

Backward differentiates the same formula. With Z = A dY A^T (dY the 4x4 block of output gradients),
dW = G^T S G with S[k] = sum over tiles of Z[k] (F, tiles) @ V[k]^T (tiles, C), 4x fewer again; dx
is the forward of dy (zero-padded by 2 - padding) with the kernel flipped and transposed, as
Conv2D's direct path computes it. In exact arithmetic all three equal the direct convolution; in
floating point they round differently: B and A hold integers up to 8, G fractions (applied in
float64, rounded once), and the error in float32 is up to some 20x the direct sum's, under 1e-5 of
the largest output (measured against float64 in tests/test_winograd.py, which also compares with
torch). Conv2D takes this path in float32 only.

The transforms are compiled kernels (rows then columns of each tile, one pass over the samples
per nonzero matrix entry, in a fixed order). The work items of the rank's threads (nn/threads.py)
are tile rows (4 output rows each), cut into blocks of tiles of at most BLOCK_BYTES: a
thread transforms a block into a (36, C, tiles) buffer, multiplies it on its own single-thread
sgemm and transforms the product back into y. dW keeps one partial S per group of tile rows, added
in row order. So the bits do not depend on the thread count; on the shapes (tiles per block,
batch) they do, as every BLAS product's, which is why deterministic mode keeps the micro-batch
size fixed.
"""

import functools

import numpy as np

from . import threads
from .kernels import compiled

TILE = 4  # m, outputs per tile side; a tile of input is m + 2 = 6 wide
# F(4x4, 3x3)'s B^T (6 x 6), G (6 x 3) and A^T (4 x 6), interpolation points 0, +-1, +-2 and infinity.
B_T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0],
       [0, 4, 0, -5, 0, 1]]
G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
     [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
A_T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
BLOCK_BYTES = 1 << 22  # a block's transformed tiles (input or output), at most: measured, docs/PERFORMANCE.md
PARTS_BYTES = 1 << 23  # dW's partial S per group of tile rows, at most this many bytes in all


def _terms(T, dtype):
    """The nonzero entries of each row of T (r, k) as the kernels take them: I (r, 6) their columns, K (r, 6) their
    values in dtype, count (r,) how many; the rows padded with column I[., 0] and value 0 (never read)."""
    T = np.asarray(T, float)
    I, K = np.zeros((len(T), 6), np.int64), np.zeros((len(T), 6), dtype)
    count = np.count_nonzero(T, axis=1).astype(np.int64)
    for u, row in enumerate(T):
        cols = np.flatnonzero(row)
        I[u], I[u, : len(cols)], K[u, : len(cols)] = cols[0], cols, row[cols]
    return I, K, count


@functools.cache
def _matrices(dtype):
    """The terms (see _terms) of B^T, A^T and A in dtype (made once per type: every layer call reads them)."""
    return _terms(B_T, dtype), _terms(A_T, dtype), _terms(np.transpose(A_T), dtype)


def tiles(Ho: int, Wo: int) -> tuple:
    """Tile rows and tiles per row of an (Ho, Wo) output."""
    return -(-Ho // TILE), -(-Wo // TILE)


def padded_hw(Ho: int, Wo: int) -> tuple:
    """The rows and columns of the padded input that correlate reads for an (Ho, Wo) output: whole tiles."""
    Th, Tw = tiles(Ho, Wo)
    return TILE * Th + 2, TILE * Tw + 2


def _tile_block(bytes_per_tile: int, Tw: int) -> int:
    """Tiles per block of a tile row: the fewest blocks of near-equal size whose transformed tiles stay within
    BLOCK_BYTES (in cache between the transform, the products and the transform back), at least 1."""
    blocks = -(-Tw // max(1, BLOCK_BYTES // bytes_per_tile))
    return -(-Tw // blocks)


def kernel_transform(W):
    """U (36, F, C) = G W[f, c] G^T of a (F, C, 3, 3) kernel (computed in float64, rounded once to W's type),
    position 6 u + l of the 6 x 6 tile."""
    g = np.array(G)
    U = np.matmul(np.matmul(g, W.astype(np.float64)), g.T)  # (F, C, a, a)
    return np.ascontiguousarray(U.reshape(*W.shape[:2], -1).transpose(2, 0, 1), dtype=W.dtype)


def correlate(xp, U, Ho: int, Wo: int, b=None, relu: bool = False):
    """y (F, Ho, Wo*N) = the 3x3 correlation of xp (Hp, C, Wp, N), already padded to padded_hw (the last tiles'
    rows and columns past the output read zeros), with the kernel whose transform is U (36, F, C), plus b,
    rectified if relu."""
    (_, C, _, N), (A, F, _) = xp.shape, U.shape
    (Th, Tw), (Bt, At, _), a = tiles(Ho, Wo), _matrices(xp.dtype), TILE + 2
    y = np.empty((F, Ho, Wo * N), xp.dtype)
    bias = b if b is not None else np.zeros(F, xp.dtype)
    tb = _tile_block(A * max(C, F) * N * xp.itemsize, Tw)

    def rows(lo, hi):
        E, V = np.empty((a, TILE * tb + 2, N), xp.dtype), np.empty((A, C, tb * N), xp.dtype)
        S, M = np.empty((TILE, a, tb, N), xp.dtype), np.empty((A, F, tb * N), xp.dtype)
        for i in range(lo, hi):
            for t0 in range(0, Tw, tb):
                n = min(Tw - t0, tb)
                Vb, Mb = V[..., : n * N], M[..., : n * N]
                to_tiles(xp, False, TILE * i, t0, *Bt, TILE, E[:, : TILE * n + 2], Vb.reshape(A, C, n, N))
                np.matmul(U, Vb, out=Mb)
                from_tiles(Mb.reshape(A, F, n, N), TILE * i, t0, *At, bias, relu, S[:, :, :n],
                           y.reshape(F, Ho, Wo, N))

    threads.run(rows, Th, y.size)
    return y


def kernel_gradient(xp, dy, Ho: int, Wo: int):
    """dW (F, C, 3, 3) of the correlation of xp (Hp, C, Wp, N) (as correlate gets it) from dy (F, Ho, Wo*N):
    G^T S G, S[k] the sum over tile rows of Z[k] @ V[k]^T, kept in one partial per group of tile rows added in
    row order."""
    (_, C, _, N), F = xp.shape, dy.shape[0]
    (Th, Tw), (Bt, _, A), a = tiles(Ho, Wo), _matrices(xp.dtype), TILE + 2
    per = -(-Th // max(1, min(Th, PARTS_BYTES // (a * a * F * C * dy.itemsize))))  # tile rows per partial
    parts = np.zeros((-(-Th // per), a * a, F, C), dy.dtype)
    g = dy.reshape(F, Ho, Wo, N)
    if (TILE * Th, TILE * Tw) != (Ho, Wo):  # the tiles past the last row or column see zeros
        g = np.pad(g, ((0, 0), (0, TILE * Th - Ho), (0, TILE * Tw - Wo), (0, 0)))
    tb = _tile_block(a * a * max(C, F) * N * xp.itemsize, Tw)

    def groups(lo, hi):
        E, V = np.empty((a, TILE * tb + 2, N), xp.dtype), np.empty((a * a, C, tb * N), xp.dtype)
        P, Z = np.empty((a, TILE * tb, N), xp.dtype), np.empty((a * a, F, tb * N), xp.dtype)
        S = np.empty((a * a, F, C), xp.dtype)
        for i in range(lo * per, min(hi * per, Th)):
            for t0 in range(0, Tw, tb):
                n = min(Tw - t0, tb)
                Vb, Zb = V[..., : n * N], Z[..., : n * N]
                to_tiles(xp, False, TILE * i, t0, *Bt, TILE, E[:, : TILE * n + 2], Vb.reshape(a * a, C, n, N))
                to_tiles(g, True, TILE * i, t0, *A, TILE, P[:, : TILE * n], Zb.reshape(a * a, F, n, N))
                parts[i // per] += np.matmul(Zb, Vb.transpose(0, 2, 1), out=S)

    threads.run(groups, len(parts), xp.size)
    S = parts.sum(axis=0).reshape(a, a, F, C)  # the partials in a fixed order whatever thread made them
    g = np.array(G)
    return np.matmul(np.matmul(g.T, S.transpose(2, 3, 0, 1)), g).astype(dy.dtype)  # (F, C, 3, 3), in float64


@compiled
def to_tiles(src, channels_first, r0, t0, I, K, count, step, E, out):
    """out (a*a, C, tb, N) = T D T^T for tiles t0 .. t0 + tb - 1 of rows r0 .. r0 + k - 1 of src (H, C, W, N)
    ((C, H, W, N) if channels_first), tile t being D = src[r0 : r0 + k, c, step t : step t + k] and T (a, k)
    given by its terms (see _terms): B^T d B of an input tile (k = a, step m) or A dY A^T of an output
    gradient's (k = step = m). Per channel, the rows first into E (a, step tb + k - step, N), then the
    columns; each term one pass over the samples, added in column order."""
    a, w0, N = I.shape[0], step * t0, out.shape[3]
    for c in range(out.shape[1]):
        for u in range(a):
            e = E[u]
            for j in range(count[u]):
                x, k = src[c, r0 + I[u, j]] if channels_first else src[r0 + I[u, j], c], K[u, j]
                for w in range(e.shape[0]):
                    if j == 0:
                        for n in range(N):
                            e[w, n] = k * x[w0 + w, n]
                    else:
                        for n in range(N):
                            e[w, n] += k * x[w0 + w, n]
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
