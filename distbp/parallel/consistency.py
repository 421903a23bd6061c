"""The cross-rank check (train.check_every): the parameters' hash compared across ranks, naming those that differ."""
from __future__ import annotations

import zlib

import numpy as np

from ..errors import UserError


class DivergenceError(UserError):
    """The parameters differ between ranks."""

    agreed = True  # every rank raises it from the same gathered hashes


def param_hash(params: np.ndarray) -> int:
    """CRC-32 of the parameter bytes: equal only if (almost surely) bitwise equal."""
    return zlib.crc32(memoryview(params).cast("B"))


def rank_groups(hashes) -> list[list[int]]:
    """Ranks grouped by equal hash, groups ordered by their first rank."""
    groups: dict[int, list[int]] = {}
    for r, h in enumerate(hashes):
        groups.setdefault(int(h), []).append(r)
    return sorted(groups.values())


def check_consistent(comm, params: np.ndarray, step: int):
    """Compare the parameter hash across ranks (one int each); raise DivergenceError naming the ranks."""
    hashes = np.zeros(comm.size, np.int64)
    hashes[comm.rank] = param_hash(params)
    comm.allgatherv(hashes, [1] * comm.size)
    groups = rank_groups(hashes)
    if len(groups) > 1:
        which = "; ".join(f"rank(s) {', '.join(map(str, g))} have crc32 {int(hashes[g[0]]):08x}" for g in groups)
        raise DivergenceError(f"parameters differ across ranks after step {step}: {which}. HINT: every rank "
                              "must run the same distbp, numpy and BLAS build; a rank's memory or an "
                              "interconnect may be faulty. Resume from the last checkpoint")
