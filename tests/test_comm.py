"""distbp.parallel.comm: collectives on one body run serial and on the world, the launcher check."""

import numpy as np
import pytest

from distbp.parallel.comm import CommError, SerialComm, check_launcher, launcher_size, node_shared_array
from distbp.datasets.dataset import Dataset



@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_allreduce_sum_in_place(any_comm, dtype):
    buf = np.full(7, any_comm.rank + 1, dtype=dtype)
    out = any_comm.allreduce_sum(buf)
    assert out is buf
    np.testing.assert_array_equal(buf, np.full(7, any_comm.size * (any_comm.size + 1) // 2, dtype=dtype))


def test_allreduce_max_in_place(any_comm):
    buf = np.array([any_comm.rank, -any_comm.rank, 5.0])
    any_comm.allreduce_max(buf)
    np.testing.assert_array_equal(buf, [any_comm.size - 1, 0.0, 5.0])


def test_bcast_overwrites_from_root(any_comm):
    buf = np.arange(6, dtype=np.float32) if any_comm.is_root else np.zeros(6, np.float32)
    any_comm.bcast(buf)
    np.testing.assert_array_equal(buf, np.arange(6, dtype=np.float32))


def test_object_collectives(any_comm):
    assert any_comm.bcast_obj({"seed": 3} if any_comm.is_root else None) == {"seed": 3}
    gathered = any_comm.gather_obj(any_comm.rank)
    assert gathered == (list(range(any_comm.size)) if any_comm.is_root else None)
    any_comm.barrier()


@pytest.mark.parametrize("bad", ["strided", "readonly", "list"])
def test_collectives_reject_unusable_buffers(any_comm, bad):
    flat = np.zeros(8, np.float32)
    buf = {"strided": flat[::2], "list": [1.0, 2.0]}.get(bad, flat)
    if bad == "readonly":
        flat.flags.writeable = False
    for op in (any_comm.allreduce_sum, any_comm.allreduce_max, any_comm.bcast):
        with pytest.raises(CommError, match="HINT"):
            op(buf)


def test_attributes_are_consistent(any_comm):
    c = any_comm
    assert 0 <= c.rank < c.size and 0 <= c.local_rank < c.local_size <= c.size
    assert c.is_root == (c.rank == 0) and isinstance(c.host, str) and c.host


@pytest.mark.mpi(min_size=2)
def test_local_size_counts_ranks_on_this_host(comm):
    hosts = comm.bcast_obj(comm.gather_obj(comm.host))
    assert comm.local_size == hosts.count(comm.host)
    local_ranks = comm.bcast_obj(comm.gather_obj((comm.host, comm.local_rank)))
    assert sorted(r for h, r in local_ranks if h == comm.host) == list(range(comm.local_size))


@pytest.mark.mpi(min_size=2)
def test_node_shared_array_is_one_copy_per_node(comm):
    a = node_shared_array(comm, (4, 3), np.float64)
    if comm.local_rank == 0:
        a[:] = np.arange(12).reshape(4, 3)
    comm.barrier()
    np.testing.assert_array_equal(a, np.arange(12).reshape(4, 3))
    comm.barrier()
    if comm.local_rank == comm.local_size - 1:
        a[0, 0] = -1.0  # a write by another rank is seen by local rank 0: same pages
    comm.barrier()
    assert a[0, 0] == -1.0


def test_node_shared_array_without_mpi_is_plain():
    a = node_shared_array(SerialComm(), (2, 5), np.uint8)
    assert a.shape == (2, 5) and a.dtype == np.uint8 and a.flags.writeable


def test_split_load_shares_memory_across_the_node(comm, make_dataset):
    path = make_dataset("shared.h5", train=50)
    with Dataset(path) as ds:
        split = ds.split("train")
        x_file, y_file = split.read(np.arange(split.n))
        assert split.load(comm=comm)
        x_mem, y_mem = split.read(np.arange(split.n))
        assert not split._x.flags.writeable
    np.testing.assert_array_equal(x_mem, x_file)
    np.testing.assert_array_equal(y_mem, y_file)
    total = np.array([x_mem.sum()], np.float64)
    np.testing.assert_allclose(comm.allreduce_sum(total), comm.size * x_file.sum(dtype=np.float64), rtol=1e-6)


def test_launcher_size_reads_the_launcher_variables():
    assert launcher_size({}) is None
    assert launcher_size({"PMI_SIZE": "4"}) == ("PMI_SIZE", 4)
    assert launcher_size({"OMPI_COMM_WORLD_SIZE": "8"}) == ("OMPI_COMM_WORLD_SIZE", 8)
    assert launcher_size({"SLURM_STEP_NUM_TASKS": "4"}) is None  # an allocation, not a step
    assert launcher_size({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "0"}) == ("SLURM_STEP_NUM_TASKS", 4)


def test_check_launcher_fails_loudly_on_a_world_of_one():
    check_launcher(4, {"PMI_SIZE": "4"})
    check_launcher(1, {"PMI_SIZE": "1"})
    with pytest.raises(CommError, match=r"PMI_SIZE=4.*different MPI.*HINT: .*mpirun"):
        check_launcher(1, {"PMI_SIZE": "4"})
    with pytest.raises(CommError, match=r"mpi4py is not installed.*HINT: pip install mpi4py"):
        check_launcher(1, {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}, have_mpi=False)
