"""Winograd's minimal filtering F(2x2, 3x3) for a 3x3, stride-1 convolution (Lavin and Gray, 2016).

A 2x2 block of outputs is Y = A^T [U . V] A with U = G g G^T (the 3x3 kernel g of one input and one
output channel, transformed to 4x4) and V = B^T d B (the 4x4 input tile d under the block, padded
input, tiles 2 apart), . the element-wise product. Summed over input channels, each of the 16
positions of the 4x4 tile is one product, M[k] = U[k] (F, C) @ V[k] (C, tiles): 16 multiply-adds
per channel pair and 2x2 outputs where the direct convolution takes 36 (2.25x fewer).

Backward differentiates the same formula. With Z = A dY A^T (dY the 2x2 block of output gradients):
dW = G^T S G with S[k] = sum over tiles of Z[k] (F, tiles) @ V[k]^T (tiles, C), 2.25x fewer again;
dx is the forward of dy (zero-padded by 2 - padding) with the kernel flipped and transposed, as
Conv2D's direct path computes it. In exact arithmetic all three equal the direct convolution's; in
floating point they round differently (B, G and A hold only 0, +-1 and 1/2, so the error stays
within a few units in the last place of the direct sum's; the tests compare with torch).

The work items of the rank's threads (nn/threads.py) are tile rows (2 output rows each): a
thread transforms its tile row into a (16, C, tiles) buffer that stays in cache, multiplies it
on its own single-thread sgemm and transforms the product back into its 2 rows of y. dW keeps one
partial S per group of tile rows, added in row order. So the bits do not depend on the thread
count; on the shapes (tiles per row, batch) they do, as every BLAS product's, which is why
deterministic mode keeps the micro-batch size fixed.
"""

import numpy as np

from . import threads
from .kernels import compiled

PARTS_BYTES = 1 << 23  # dW's partial S per group of tile rows, at most this many bytes in all
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])


def padded_hw(Ho: int, Wo: int) -> tuple:
    """The rows and columns of the padded input that correlate reads for an (Ho, Wo) output: whole tiles."""
    return 2 * -(-Ho // 2) + 2, 2 * -(-Wo // 2) + 2


def kernel_transform(W):
    """U (16, F, C) = G W[f, c] G^T of a (F, C, 3, 3) kernel, position k = 4 a + b of the 4x4 tile."""
    G = _G.astype(W.dtype)
    U = np.matmul(np.matmul(G, W), G.T)  # (F, C, 4, 4)
    return np.ascontiguousarray(U.reshape(*W.shape[:2], 16).transpose(2, 0, 1))


def correlate(xp, U, Ho: int, Wo: int, b=None, relu: bool = False):
    """y (F, Ho, Wo*N) = the 3x3 correlation of xp (Hp, C, Wp, N), already padded, with the kernel whose
    transform is U (16, F, C), plus b, rectified if relu. xp holds at least 2*ceil(Ho/2) + 2 rows and
    2*ceil(Wo/2) + 2 columns (the last tile's row and column past the output read zeros)."""
    (_, C, _, N), F = xp.shape, U.shape[1]
    Th, Tw = -(-Ho // 2), -(-Wo // 2)
    y = np.empty((F, Ho, Wo * N), xp.dtype)
    bias = b if b is not None else np.zeros(F, xp.dtype)

    def rows(lo, hi):
        E, V = np.empty((4, 2 * Tw + 2, N), xp.dtype), np.empty((16, C, Tw * N), xp.dtype)
        S, M = np.empty((2, 4, Tw, N), xp.dtype), np.empty((16, F, Tw * N), xp.dtype)
        for i in range(lo, hi):
            input_tiles(xp, i, E, V.reshape(16, C, Tw, N))
            np.matmul(U, V, out=M)
            output_tiles(M.reshape(16, F, Tw, N), i, bias, relu, S, y.reshape(F, Ho, Wo, N))

    threads.run(rows, Th, y.size)
    return y


def kernel_gradient(xp, dy, Ho: int, Wo: int):
    """dW (F, C, 3, 3) of the correlation of xp (Hp, C, Wp, N) (as correlate gets it) from dy (F, Ho, Wo*N):
    G^T S G, S[k] the sum over tile rows of Z[k] @ V[k]^T, kept in one partial per group of tile rows added in
    row order."""
    (_, C, _, N), F = xp.shape, dy.shape[0]
    Th, Tw = -(-Ho // 2), -(-Wo // 2)
    per = -(-Th // max(1, min(Th, PARTS_BYTES // (16 * F * C * dy.itemsize))))  # tile rows per partial
    parts = np.zeros((-(-Th // per), 16, F, C), dy.dtype)
    g = dy.reshape(F, Ho, Wo, N)
    if (Ho % 2, Wo % 2) != (0, 0):  # the tiles past the last row or column see zeros
        g = np.pad(g, ((0, 0), (0, Ho % 2), (0, Wo % 2), (0, 0)))

    def groups(lo, hi):
        E, V = np.empty((4, 2 * Tw + 2, N), xp.dtype), np.empty((16, C, Tw * N), xp.dtype)
        P, Z = np.empty((4, 2 * Tw, N), xp.dtype), np.empty((16, F, Tw * N), xp.dtype)
        S = np.empty((16, F, C), xp.dtype)
        for i in range(lo * per, min(hi * per, Th)):
            input_tiles(xp, i, E, V.reshape(16, C, Tw, N))
            gradient_tiles(g, i, P, Z.reshape(16, F, Tw, N))
            parts[i // per] += np.matmul(Z, V.transpose(0, 2, 1), out=S)

    threads.run(groups, len(parts), xp.size)
    S = parts.sum(axis=0).reshape(4, 4, F, C)  # the partials in a fixed order whatever thread made them
    G = _G.astype(dy.dtype)
    return np.matmul(np.matmul(G.T, S.transpose(2, 3, 0, 1)), G)  # (F, C, 3, 3)


@compiled
def input_tiles(xp, i, E, V):
    """V (16, C, Tw, N) = B^T d B for the Tw tiles of tile row i, d = xp[2i:2i+4, c, 2t:2t+4, n] of xp
    (Hp, C, Wp, N), B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]: per channel, the rows
    first into E (4, 2 Tw + 2, N), then the columns; each loop one store stream over N (it vectorizes)."""
    r, N = 2 * i, V.shape[3]
    for c in range(V.shape[1]):
        for w in range(E.shape[1]):
            x0, x1, x2, x3 = xp[r, c, w], xp[r + 1, c, w], xp[r + 2, c, w], xp[r + 3, c, w]
            e0, e1, e2, e3 = E[0, w], E[1, w], E[2, w], E[3, w]
            for n in range(N):
                e0[n] = x0[n] - x2[n]
            for n in range(N):
                e1[n] = x1[n] + x2[n]
            for n in range(N):
                e2[n] = x2[n] - x1[n]
            for n in range(N):
                e3[n] = x1[n] - x3[n]
        for k in range(4):
            for t in range(V.shape[2]):
                a, b, d, e = E[k, 2 * t], E[k, 2 * t + 1], E[k, 2 * t + 2], E[k, 2 * t + 3]
                v0, v1, v2, v3 = V[4 * k, c, t], V[4 * k + 1, c, t], V[4 * k + 2, c, t], V[4 * k + 3, c, t]
                for n in range(N):
                    v0[n] = a[n] - d[n]
                for n in range(N):
                    v1[n] = b[n] + d[n]
                for n in range(N):
                    v2[n] = d[n] - b[n]
                for n in range(N):
                    v3[n] = b[n] - e[n]


@compiled
def output_tiles(M, i, b, relu, S, y):
    """Rows 2i and 2i+1 of y (F, Ho, Wo, N) = A^T M A (+ b[f], then np.maximum(., 0) if relu) for the Tw
    tiles of tile row i, M (16, F, Tw, N), A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]: per channel, the rows first
    into S (2, 4, Tw, N), then the columns; outputs past Ho or Wo are dropped."""
    Ho, Wo, N, r = y.shape[1], y.shape[2], M.shape[3], 2 * i
    for f in range(M.shape[1]):
        for l in range(4):
            for t in range(M.shape[2]):
                m0, m1, m2, m3 = M[l, f, t], M[4 + l, f, t], M[8 + l, f, t], M[12 + l, f, t]
                s, d = S[0, l, t], S[1, l, t]
                for n in range(N):
                    s[n] = m0[n] + m1[n] + m2[n]
                for n in range(N):
                    d[n] = m1[n] - m2[n] - m3[n]
        bf = b[f]
        for h in range(min(2, Ho - r)):
            for t in range(M.shape[2]):
                s0, s1, s2, s3 = S[h, 0, t], S[h, 1, t], S[h, 2, t], S[h, 3, t]
                o = y[f, r + h, 2 * t]
                for n in range(N):
                    v = s0[n] + s1[n] + s2[n] + bf
                    o[n] = (v if v > 0 or v != v else 0) if relu else v
                if 2 * t + 1 < Wo:
                    o = y[f, r + h, 2 * t + 1]
                    for n in range(N):
                        v = s1[n] - s2[n] - s3[n] + bf
                        o[n] = (v if v > 0 or v != v else 0) if relu else v


@compiled
def gradient_tiles(g, i, P, Z):
    """Z (16, F, Tw, N) = A dY A^T for the Tw tiles of tile row i, dY = g[f, 2i:2i+2, 2t:2t+2, n] of g
    (F, 2 Th, 2 Tw, N), A = [[1, 0], [1, 1], [1, -1], [0, -1]]: per channel, the rows first into P (4, 2 Tw, N),
    then the columns."""
    r, N = 2 * i, Z.shape[3]
    for f in range(Z.shape[1]):
        for w in range(P.shape[1]):
            g0, g1 = g[f, r, w], g[f, r + 1, w]
            p0, p1, p2, p3 = P[0, w], P[1, w], P[2, w], P[3, w]
            for n in range(N):
                p0[n] = g0[n]
            for n in range(N):
                p1[n] = g0[n] + g1[n]
            for n in range(N):
                p2[n] = g0[n] - g1[n]
            for n in range(N):
                p3[n] = -g1[n]
        for k in range(4):
            for t in range(Z.shape[2]):
                a, c = P[k, 2 * t], P[k, 2 * t + 1]
                z0, z1, z2, z3 = Z[4 * k, f, t], Z[4 * k + 1, f, t], Z[4 * k + 2, f, t], Z[4 * k + 3, f, t]
                for n in range(N):
                    z0[n] = a[n]
                for n in range(N):
                    z1[n] = a[n] + c[n]
                for n in range(N):
                    z2[n] = a[n] - c[n]
                for n in range(N):
                    z3[n] = -c[n]
