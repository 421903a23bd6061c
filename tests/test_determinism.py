"""Deterministic mode: tree index math, the fixed-order exchange, the cross-rank check, and
bitwise-identical training on 1, 2, 3, 4 and 8 ranks (dropout on, SGD and Adam, resume 4 -> 3)."""
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from distbp.files import checkpoint as ckpt
from distbp.parallel.comm import SerialComm
from distbp.config import ConfigError, load_config
from distbp.datasets.dataset import write_dataset
from distbp.parallel.determinism import TreeStack, aligned_blocks, is_left_sibling, rank_blocks
from distbp.parallel.sampler import shard
from distbp.parallel.consistency import DivergenceError, check_consistent, param_hash, rank_groups
from distbp.training.step import DeterministicStep, StepScalars
from distbp.nn import Sequential, make_loss, mlp_specs
from conftest import run_distbp



# ---- index math ----

@given(st.integers(0, 300), st.integers(0, 300))
def test_aligned_blocks_are_the_maximal_tree_nodes_of_a_run(a, b):
    a, b = min(a, b), max(a, b)
    blocks = aligned_blocks(a, b)
    assert [s for s, _ in blocks] == [a + sum(n for _, n in blocks[:i]) for i in range(len(blocks))]
    assert sum(n for _, n in blocks) == b - a
    for s, n in blocks:
        assert n & (n - 1) == 0 and s % n == 0  # a node of the tree
        parent = (s - s % (2 * n), 2 * n)
        assert not (a <= parent[0] and parent[0] + parent[1] <= b)  # maximal: its parent sticks out
    assert all(not is_left_sibling(x, y) for x, y in zip(blocks, blocks[1:]))


def test_rank_blocks_concatenate_to_all_shards_in_order():
    for shards in (1, 5, 7, 8, 13):
        for size in (1, 2, 3, 4, 8):
            every = [node for bl in rank_blocks(shards, size) for node in bl]
            assert [s for s, _ in every] == sorted(s for s, _ in every)
            assert sum(n for _, n in every) == shards
    assert rank_blocks(7, 3) == [[(0, 2), (2, 1)], [(3, 1), (4, 1)], [(5, 1), (6, 1)]]
    assert rank_blocks(7, 8)[7] == []


def test_sibling_needs_alignment():
    assert is_left_sibling((4, 2), (6, 2)) and is_left_sibling((0, 1), (1, 1))
    assert not is_left_sibling((2, 2), (4, 2)) and not is_left_sibling((3, 1), (4, 1))
    assert not is_left_sibling((0, 2), (2, 1))


# ---- the tree on arrays ----

def reference_tree(leaves: list, s: int, n: int) -> np.ndarray:
    """The tree's definition, recursively: node [s, s+n) = left half + right half, empty right = left."""
    if n == 1:
        return leaves[s].copy()
    left = reference_tree(leaves, s, n // 2)
    if s + n // 2 >= len(leaves):
        return left
    return left + reference_tree(leaves, s + n // 2, n // 2)


def leaves_with_rounding(shards: int, seed: int = 0) -> list:
    """float32 vectors of very different magnitudes, so the summation order shows in the bits."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(64) * 10.0 ** rng.integers(-4, 5, 64)).astype(np.float32) for _ in range(shards)]


def tree_sum_over_ranks(leaves: list, size: int) -> np.ndarray:
    """What the ranks compute: each run's blocks locally, then one tree over everyone's blocks."""
    blocks = []
    for (a, b), nodes in zip((shard(len(leaves), r, size) for r in range(size)), rank_blocks(len(leaves), size)):
        local = TreeStack()
        for j in range(a, b):
            local.push((j, 1), leaves[j].copy())
        assert local.nodes == nodes
        blocks += zip(local.nodes, local.values)
    tree = TreeStack()
    for node, value in blocks:
        tree.push(node, value)
    return tree.root()


@pytest.mark.parametrize("shards", [1, 2, 5, 7, 8, 11, 16])
def test_tree_sum_has_the_same_bits_for_every_rank_count(shards):
    leaves = leaves_with_rounding(shards)
    want = reference_tree(leaves, 0, 1 << (shards - 1).bit_length())
    for size in (1, 2, 3, 4, 5, 8):
        assert tree_sum_over_ranks(leaves, size).tobytes() == want.tobytes(), (shards, size)


def test_the_order_matters_so_the_test_can_fail():
    leaves = leaves_with_rounding(7)
    in_a_row = leaves[0].copy()
    for v in leaves[1:]:
        in_a_row += v
    assert in_a_row.tobytes() != tree_sum_over_ranks(leaves, 1).tobytes()


def test_tree_stack_adds_into_the_left_sibling_and_frees_the_right():
    a, b, c = (np.full(3, v, np.float32) for v in (1, 2, 4))
    stack = TreeStack()
    assert stack.push((0, 1), a) == [] and stack.push((1, 1), b) == [b]
    assert stack.push((2, 1), c) == [] and stack.root() is a and a.tolist() == [7, 7, 7]


# ---- the cross-rank check ----

def test_rank_groups_and_hash():
    assert rank_groups([5, 5, 7, 5]) == [[0, 1, 3], [2]]
    a = np.arange(10, dtype=np.float32)
    b = a.copy()
    b[3] = np.nextafter(b[3], np.inf)
    assert param_hash(a) == param_hash(a.copy()) != param_hash(b)


ONE_ULP = """
import sys
import numpy as np
from distbp.parallel.comm import world
from distbp.parallel.consistency import DivergenceError, check_consistent
comm = world()
params = np.linspace(0, 1, 1000, dtype=np.float32)
check_consistent(comm, params, step=4)  # equal on every rank: passes
if comm.rank == 1:
    params[int(sys.argv[1])] = np.nextafter(params[int(sys.argv[1])], np.inf)  # one parameter, one ulp
try:
    check_consistent(comm, params, step=9)
except DivergenceError as e:
    print(f"rank {comm.rank}: {e}")
    sys.exit(0)
sys.exit(f"rank {comm.rank}: not caught")
"""


@pytest.mark.parametrize("where", [0, 999])
def test_check_consistent_catches_one_differing_parameter_on_two_ranks(serial, tmp_path, where):
    """Two ranks whose parameters differ in one value by one ulp: both raise, naming rank 1 apart from rank 0."""
    script = tmp_path / "one_ulp.py"
    script.write_text(ONE_ULP)
    proc = run_distbp([where], 2, script=script, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        assert re.search(rf"rank {rank}: parameters differ across ranks after step 9: rank\(s\) 0 have crc32 "
                         r"\w+; rank\(s\) 1 have crc32", proc.stdout), proc.stdout


@pytest.mark.mpi(min_size=2)
def test_check_consistent_names_the_diverged_rank(comm):
    params = np.linspace(0, 1, 1000, dtype=np.float32)
    check_consistent(comm, params, step=4)
    if comm.rank == 1:
        params[500] = np.nextafter(params[500], np.inf)
    others = ", ".join(str(r) for r in range(comm.size) if r != 1)
    with pytest.raises(DivergenceError, match=rf"after step 9: rank\(s\) {others} have crc32 \w+; rank\(s\) 1 have"):
        check_consistent(comm, params, step=9)


# ---- the step on any comm ----

def check_exchange(comm, dtype):
    """exchange with two messages of rank-dependent length per pair, and allgatherv with uneven pieces."""
    size, rank = comm.size, comm.rank
    sends = [(q, np.full(q + 1, 100 * rank + 10 * k + q, dtype)) for q in range(size) for k in (0, 1)]
    recvs = [(q, np.zeros(rank + 1, dtype)) for q in range(size) for k in (0, 1)]
    comm.exchange(sends, recvs)
    for (q, buf), k in zip(recvs, [0, 1] * size):
        np.testing.assert_array_equal(buf, [100 * q + 10 * k + rank] * (rank + 1))
    buf = np.zeros(size * (size + 1) // 2, dtype)
    lo = rank * (rank + 1) // 2
    buf[lo:lo + rank + 1] = rank + 1
    comm.allgatherv(buf, [q + 1 for q in range(size)])
    np.testing.assert_array_equal(buf, [q + 1 for q in range(size) for _ in range(q + 1)])


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_exchange_primitives_serial(dtype):
    check_exchange(SerialComm(), dtype)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_exchange_primitives_on_the_world(comm, dtype):
    check_exchange(comm, dtype)


def step_gradient(comm, rows: int, micro_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(gradient, scalars) of one deterministic step of a small dropout MLP on comm."""
    model = Sequential(mlp_specs([12, 20, 16, 3], "relu", 0.3), (12,), seed=2)
    model.ctx.step = 5
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((rows, 12)).astype(np.float32), rng.integers(0, 3, rows)
    det = DeterministicStep(model, make_loss("classification"), comm, micro_batch)
    positions = det.positions(rows)
    scalars = StepScalars()
    scalars.loss_sum, scalars.correct = det.forward_backward(x[positions], y[positions], positions, rows)
    scalars.rows = len(positions)
    det.reduce(model.grads, scalars)
    return model.grads.copy(), scalars.buf


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("rows, micro_batch", [(50, 8), (16, 4), (9, 4), (5, 8)])
def test_step_on_the_world_has_the_bits_of_one_rank(comm, rows, micro_batch):
    grads, scalars = step_gradient(comm, rows, micro_batch)
    alone, alone_scalars = step_gradient(SerialComm(), rows, micro_batch)
    assert grads.tobytes() == alone.tobytes()
    assert scalars.tobytes() == alone_scalars.tobytes() and scalars[0] == rows
    assert len(set(comm.bcast_obj(comm.gather_obj(grads.tobytes())))) == 1


def test_step_matches_the_plain_gradient_to_rounding():
    grads, scalars = step_gradient(SerialComm(), 50, 8)
    model = Sequential(mlp_specs([12, 20, 16, 3], "relu", 0.3), (12,), seed=2)
    model.ctx.step = 5
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((50, 12)).astype(np.float32), rng.integers(0, 3, 50)
    loss = make_loss("classification")
    out = model.forward(x)
    loss_sum = loss.forward(out, y)
    model.backward(loss.backward() / 50, need_dx=False)
    np.testing.assert_allclose(grads, model.grads, rtol=1e-5, atol=1e-7)
    assert scalars[1] == pytest.approx(loss_sum, rel=1e-6)  # float32 row losses, other batch shapes


def test_step_writes_into_few_reused_vectors_and_rebinds_the_layers_to_model_grads():
    model = Sequential(mlp_specs([12, 20, 3], "relu"), (12,), seed=2)
    det = DeterministicStep(model, make_loss("classification"), SerialComm(), 4)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((32, 12)).astype(np.float32), rng.integers(0, 3, 32)
    for _ in range(2):
        det.forward_backward(x, y, np.arange(32), 32)
        det.reduce(model.grads, StepScalars())
    assert len(det.targets.made) == 3  # 8 shards: the tree is 3 deep, model.grads holds the root
    assert all(np.shares_memory(layer.dW, model.grads) for layer in model.layers if hasattr(layer, "dW"))


def test_config_rejects_batchnorm_in_deterministic_mode():
    with pytest.raises(ConfigError, match="train.deterministic=true cannot train a batchnorm layer.*layernorm"):
        load_config(None, ["train.deterministic=true",
                           'model.layers=[{type="linear", out=8}, {type="batchnorm"}, {type="linear", out=3}]'])


# ---- end to end: the CLI on 1, 2, 3, 4 and 8 ranks ----



@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """140 train rows: batches of 48, 48 and a partial 44 (7 shards of 7 rows, the last short)."""
    path = tmp_path_factory.mktemp("det") / "data.h5"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((160, 10)).astype(np.float32)
    y = (np.arange(160) % 4).astype(np.int64)
    write_dataset(path, {"train": (x[:140], y[:140]), "val": (x[140:], y[140:])}, num_classes=4)
    return path


def train(run_dir: Path, data: Path, ranks: int, optim: str, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """distbp train in deterministic mode with dropout on `ranks` ranks."""
    sets = [f"data.path={json.dumps(str(data))}", "model.hidden=[24, 16]", "model.dropout=0.3",
            "train.batch_size=48", "train.micro_batch=7", "train.drop_last=false", "train.epochs=5",
            f"train.max_steps={steps}", "train.deterministic=true", "train.check_every=2",
            f"optim.name={json.dumps(optim)}", "optim.lr=0.01", "train.stall_timeout=0", *extra]
    args = ["train", "--run-dir", run_dir]
    for s in sets:
        args += ["--set", s]
    proc = run_distbp(args, ranks, timeout=50)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def state_bytes(run_dir: Path, step: int) -> dict:
    """Every array (params and optimizer state) of a run's checkpoint as bytes, plus its losses."""
    ck = ckpt.load(run_dir / "checkpoints" / ckpt.checkpoint_name(step))
    arrays = {f"params/{k}": v.tobytes() for k, v in ck.params.items()}
    arrays.update({f"{s}/{k}": v.tobytes() for s, d in ck.opt_arrays.items() for k, v in d.items()})
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {d["step"]: d["loss"] for d in lines if "loss" in d}
    return {"arrays": arrays, "scalars": ck.opt_scalars, "losses": losses}


def test_sgd_is_bitwise_identical_on_1_2_3_4_and_8_ranks(tmp_path, data_file):
    runs = {n: tmp_path / f"sgd{n}" for n in (1, 2, 3, 4, 8)}
    for n, run_dir in runs.items():
        train(run_dir, data_file, n, "sgd", 7, "train.log_every=1")
    want = state_bytes(runs[1], 7)
    assert "momentum_buffer/6.linear.W" in want["arrays"] and len(want["losses"]) == 7  # a partial batch at step 3
    for n in (2, 3, 4, 8):
        assert state_bytes(runs[n], 7) == want, f"{n} ranks differ from 1 rank"


def test_adam_is_bitwise_identical_across_rank_counts_and_a_resume_4_to_3(tmp_path, data_file):
    straight = tmp_path / "straight"
    train(straight, data_file, 1, "adam", 8, "train.log_every=1")
    moved = tmp_path / "moved"
    train(moved, data_file, 4, "adam", 4, "train.log_every=1")
    proc = train(moved, data_file, 3, "adam", 8, "train.log_every=1")
    assert "written by 4 rank(s), now 3" in proc.stdout
    other = tmp_path / "other"
    train(other, data_file, 8, "adam", 8, "train.log_every=1")
    want = state_bytes(straight, 8)
    assert {"exp_avg/0.linear.W", "exp_avg_sq/6.linear.W"} <= set(want["arrays"])
    for run_dir in (moved, other):
        assert state_bytes(run_dir, 8) == want
    summaries = [json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (straight, moved, other)]
    assert len({s["params_crc32"] for s in summaries}) == 1


DIVERGE = """
import sys
import numpy as np
import importlib
train = importlib.import_module("distbp.training.loop")  # the loop's module: distbp.train is the API function
from distbp.cli import main

check = train.check_consistent
def perturbed(comm, params, step):
    if comm.rank == 2 and step == 4:
        params[0] = np.nextafter(params[0], np.inf)
    check(comm, params, step)
train.check_consistent = perturbed
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("mode", ["true", "false"])
def test_check_every_stops_a_diverged_run_naming_step_and_rank(tmp_path, data_file, mode):
    script = tmp_path / "diverge.py"
    script.write_text(DIVERGE)
    args = ["train", "--run-dir", tmp_path / "run", "--set", f"data.path={json.dumps(str(data_file))}",
            "--set", "model.hidden=[8]", "--set", "train.batch_size=48", "--set", "train.check_every=2",
            "--set", f"train.deterministic={mode}", "--set", "train.max_steps=10"]
    proc = run_distbp(args, 3, script=script, timeout=50)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.count("parameters differ across ranks after step 4: rank(s) 0, 1 have crc32") == 1
    assert "rank(s) 2 have crc32" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints" / ckpt.checkpoint_name(10)).exists()


def test_a_conv_model_is_bitwise_identical_on_1_2_and_3_ranks(tmp_path, data_file):
    layers = ('model.layers=[{type="reshape", shape=[1, 2, 5]}, {type="conv2d", out_channels=4, kernel=[2, 3], '
              'padding=1}, {type="relu"}, {type="maxpool2d", kernel=2}, {type="conv2d", out_channels=3, kernel=1}, '
              '{type="flatten"}, {type="linear", out=4}]')
    runs = {n: tmp_path / f"conv{n}" for n in (1, 2, 3)}
    for n, run_dir in runs.items():
        train(run_dir, data_file, n, "sgd", 4, layers)
    want = state_bytes(runs[1], 4)
    assert "params/1.conv2d.W" in want["arrays"]
    for n in (2, 3):
        assert state_bytes(runs[n], 4) == want, f"{n} ranks differ from 1 rank"
