"""The sharded optimizer step (train.shard_optimizer, ZeRO-1) against the replicated one."""
import numpy as np
import pytest

from conftest import run_distbp
from distbp.optim import make_optimizer
from distbp.parallel.sampler import shard_counts
from distbp.parallel.zero import AUTO_PARAMS, ShardedOptimizer, sharded, state_bytes
from test_train import final_params, synthetic_file

OPTIONS = [("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
           ("sgd", {"momentum": 0.5, "dampening": 0.1}),
           ("adam", {"weight_decay": 1e-2}),
           ("adamw", {}),
           ("rmsprop", {"momentum": 0.9, "centered": True, "weight_decay": 1e-3})]


@pytest.mark.parametrize("name, options", OPTIONS)
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_slices_step_as_the_whole_vector_bitwise(name, options, size):
    n, steps, rng = 1003, 4, np.random.default_rng(0)
    whole = make_optimizer(name, n, np.float32, **options)
    shards = [ShardedOptimizer(lambda k: make_optimizer(name, k, np.float32, **options), n, np.float32, r, size)
              for r in range(size)]
    p = rng.standard_normal(n).astype(np.float32)
    q = p.copy()
    for t in range(steps):
        g = rng.standard_normal(n).astype(np.float32)
        for sh in shards:  # each rank updates its slice of q from its slice of the gradient
            sh.step(q, g[sh.owned].copy(), 0.01)
        whole.step(p, g.copy(), 0.01)
    assert q.tobytes() == p.tobytes()
    for k, a in whole.state_arrays().items():
        assert np.concatenate([sh.state_arrays()[k] for sh in shards]).tobytes() == a.tobytes()
    assert [sh.owned.stop - sh.owned.start for sh in shards] == shard_counts(n, size)
    assert sum(state_bytes(sh) for sh in shards) == state_bytes(whole)


@pytest.mark.mpi(min_size=2)
def test_full_state_gathers_to_rank_0_and_loads_back(comm):
    n = 1001
    make = lambda k: make_optimizer("adam", k, np.float64)  # noqa: E731
    opt = ShardedOptimizer(make, n, np.float64, comm.rank, comm.size)
    p, g = np.zeros(n), np.arange(n, dtype=np.float64)
    opt.step(p, g[opt.owned].copy(), 0.1)
    full = opt.full_state(comm)
    whole = make(n)
    whole.step(np.zeros(n), g.copy(), 0.1)
    if comm.is_root:
        assert {k: a.tobytes() for k, a in full.items()} == {k: a.tobytes() for k, a in whole.state_arrays().items()}
    else:
        assert full == {}
    again = ShardedOptimizer(make, n, np.float64, comm.rank, comm.size)
    again.load_state(whole.state_arrays(), whole.state_scalars())
    assert all(np.array_equal(a, opt.state_arrays()[k]) for k, a in again.state_arrays().items())


def train(tmp_path, name, n, sets, steps, resume="never"):
    """Parameters of the checkpoint at `steps` of `distbp train` on n ranks, and the run's log."""
    run_dir = tmp_path / name
    args = ["train", *[a for s in sets for a in ("--set", s)], "--set", f"train.max_steps={steps}",
            "--run-dir", run_dir, "--resume", resume]
    proc = run_distbp(args, n, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return final_params(run_dir, steps)[0], proc.stdout


@pytest.mark.parametrize("optim, dtype, rtol", [("sgd", "float64", 1e-9), ("adam", "float64", 1e-9),
                                                 ("adam", "float32", 1e-5)])
def test_sharded_runs_equal_replicated_runs_after_100_steps(serial, tmp_path, optim, dtype, rtol):
    data = synthetic_file(tmp_path / "data.h5")  # 200 train rows, batch 32: 6 steps per epoch
    sets = [f'data.path="{data}"', "train.batch_size=32", "model.hidden=[16]", f'train.dtype="{dtype}"',
            f'optim.name="{optim}"', "optim.lr=0.01", "optim.momentum=0.9", "train.epochs=100"]
    for n in (1, 2, 3, 4):
        replicated, _ = train(tmp_path, f"rep{n}", n, [*sets, "train.shard_optimizer=false"], 100)
        sharded, log = train(tmp_path, f"zero{n}", n, [*sets, "train.shard_optimizer=true"], 100)
        if n > 1:
            assert f"1/{n} of it (train.shard_optimizer)" in log
        scale = np.abs(replicated).max()
        np.testing.assert_allclose(sharded, replicated, rtol=rtol, atol=rtol * scale, err_msg=f"{n} ranks")


def test_sharded_deterministic_runs_are_bitwise_equal_and_resume_on_another_rank_count(serial, tmp_path):
    data = synthetic_file(tmp_path / "data.h5")
    sets = [f'data.path="{data}"', "train.batch_size=32", "model.hidden=[16]", 'optim.name="adam"',
            "optim.lr=0.01", "train.epochs=100", "train.deterministic=true", "train.micro_batch=8"]
    zero = [*sets, "train.shard_optimizer=true", "checkpoint.every_steps=40"]
    reference, _ = train(tmp_path, "rep1", 1, [*sets, "train.shard_optimizer=false"], 100)
    for n in (2, 3):
        sharded, _ = train(tmp_path, f"zero{n}", n, zero, 100)
        assert sharded.tobytes() == reference.tobytes(), f"{n} ranks"
    train(tmp_path, "resumed", 2, zero, 40)  # sharded over 2 ranks, then resumed sharded over 3
    resumed, log = train(tmp_path, "resumed", 3, zero, 100, resume="auto")
    assert "resumed from" in log and "written by 2 rank(s), now 3" in log
    assert resumed.tobytes() == reference.tobytes()


def test_auto_shards_large_models_at_two_ranks_or_more():
    assert [sharded("auto", ranks, AUTO_PARAMS) for ranks in (1, 2, 8)] == [False, True, True]
    assert not sharded("auto", 8, AUTO_PARAMS - 1)  # a small model: the extra collective call costs more
    assert sharded(True, 2, 10) and not sharded(True, 11, 10) and not sharded(False, 8, 10**9)


def test_auto_is_the_default_and_shards_a_1m_parameter_model(serial, tmp_path):
    data = synthetic_file(tmp_path / "data.h5")
    sets = [f'data.path="{data}"', "train.batch_size=32", "model.hidden=[1024, 1024]"]  # 1.06M parameters
    _, log = train(tmp_path, "big", 2, sets, 2)
    assert "1/2 of it (train.shard_optimizer)" in log
    _, log = train(tmp_path, "small", 2, [f'data.path="{data}"', "train.batch_size=32", "model.hidden=[16]"], 2)
    assert "of it (train.shard_optimizer)" not in log
