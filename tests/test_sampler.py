"""distbp.sampler: the epoch permutation, the global batches, per-rank and micro-shard slices (no MPI)."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distbp.parallel.sampler import (GlobalBatches, epoch_order, micro_shard_slice, num_shards, shard, shard_rows,
                            steps_per_epoch)


def test_epoch_order_depends_on_seed_and_epoch_alone():
    a = epoch_order(7, 3, 100)
    np.testing.assert_array_equal(a, epoch_order(7, 3, 100))
    np.testing.assert_array_equal(np.sort(a), np.arange(100))
    assert not np.array_equal(a, epoch_order(7, 4, 100)) and not np.array_equal(a, epoch_order(8, 3, 100))
    with pytest.raises(ValueError, match="non-negative"):
        epoch_order(-1, 0, 10)


def test_steps_per_epoch():
    assert steps_per_epoch(100, 32) == 3 and steps_per_epoch(100, 32, drop_last=False) == 4
    assert steps_per_epoch(64, 64) == 1 and steps_per_epoch(63, 64) == 0 and steps_per_epoch(63, 64, False) == 1
    with pytest.raises(ValueError, match="batch_size=0"):
        steps_per_epoch(10, 0)


def test_shard_is_near_equal_with_larger_slices_first():
    assert [shard(64, r, 3) for r in range(3)] == [(0, 22), (22, 43), (43, 64)]
    assert [shard(2, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]


@settings(deadline=None)
@given(batch=st.integers(0, 300), size=st.integers(1, 17))
def test_shard_covers_the_batch_contiguously(batch, size):
    slices = [shard(batch, r, size) for r in range(size)]
    assert slices[0][0] == 0 and slices[-1][1] == batch
    assert all(slices[r][1] == slices[r + 1][0] for r in range(size - 1))
    lengths = [hi - lo for lo, hi in slices]
    assert lengths == sorted(lengths, reverse=True) and max(lengths) - min(lengths) <= 1


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 200), batch=st.integers(1, 70), size=st.integers(1, 9), seed=st.integers(0, 2**32),
       drop_last=st.booleans())
def test_rank_slices_split_the_global_batch_exactly(n, batch, size, seed, drop_last):
    order, batches = epoch_order(seed, 0, n), GlobalBatches(n, batch, seed, drop_last)
    seen = []
    for step in range(batches.steps_per_epoch):
        whole = batches.indices(0, step)  # the global batch's dataset indices
        np.testing.assert_array_equal(whole, order[step * batch:(step + 1) * batch])
        parts = [np.arange(*shard(len(whole), r, size)) for r in range(size)]  # positions of each rank
        np.testing.assert_array_equal(np.concatenate(parts), np.arange(len(whole)))  # no overlap, no gap
        seen.append(whole)
    seen = np.concatenate(seen) if seen else np.array([], np.int64)
    assert len(np.unique(seen)) == len(seen) == (n // batch * batch if drop_last else n)


def test_global_batches_last_partial_batch_and_next_epoch():
    batches = GlobalBatches(10, 4, 0, drop_last=False)
    assert batches.steps_per_epoch == 3
    np.testing.assert_array_equal(batches.indices(0, 2), epoch_order(0, 0, 10)[8:10])
    np.testing.assert_array_equal(batches.indices(1, 0), epoch_order(0, 1, 10)[:4])
    with pytest.raises(ValueError, match="past the 10 rows"):
        batches.indices(0, 3)


def test_shards_cover_the_batch_with_a_short_last_one():
    assert num_shards(50, 8) == 7 and num_shards(48, 8) == 6 and num_shards(1, 8) == 1
    assert [shard_rows(j, 50, 8) for j in (0, 5, 6)] == [(0, 8), (40, 48), (48, 50)]


@settings(deadline=None)
@given(count=st.integers(0, 300), micro=st.integers(1, 20), size=st.integers(1, 9))
def test_micro_shard_slices_are_whole_shards_covering_the_batch(count, micro, size):
    slices = [micro_shard_slice(count, micro, r, size) for r in range(size)]
    assert slices[0][0] == 0 and slices[-1][1] == count
    assert all(slices[r][1] == slices[r + 1][0] for r in range(size - 1))
    assert all(lo % micro == 0 for lo, hi in slices if hi > lo)  # a non-empty slice starts on a shard boundary
    shards = [-(-(hi - lo) // micro) for lo, hi in slices]
    assert sum(shards) == num_shards(count, micro) and max(shards) - min(shards) <= 1


def test_the_sampler_needs_no_hdf5_or_mpi():
    code = "import sys, distbp.parallel.sampler; sys.exit(bool({'h5py', 'mpi4py'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
