"""Overlapped gradient reduction (train.overlap): buckets, their reduction, and runs equal to the blocking step."""
import re

import numpy as np
import pytest

from distbp.nn import layers, mlp_specs
from distbp.nn.model import Sequential
from distbp.parallel.buckets import Bucket, OverlappedReduction, bucket_bounds, layer_spans, model_buckets, \
    piece_counts
from distbp.parallel.comm import SerialComm
from distbp.parallel.sampler import shard, shard_counts
from test_train import synthetic_file
from test_zero import train


# ---- index math ----

def test_buckets_hold_whole_layers_in_reverse_order():
    spans = {0: (0, 100), 2: (100, 150), 4: (150, 160), 6: (160, 400)}
    assert bucket_bounds(spans, 60) == [Bucket(160, 400, 6), Bucket(100, 160, 2), Bucket(0, 100, 0)]
    assert bucket_bounds(spans, 1) == [Bucket(160, 400, 6), Bucket(150, 160, 4), Bucket(100, 150, 2),
                                       Bucket(0, 100, 0)]
    assert bucket_bounds(spans, 10**6) == [Bucket(0, 400, 0)]  # one bucket: the blocking step's one allreduce
    assert bucket_bounds(spans, 301) == [Bucket(0, 400, 0)]  # the last bucket takes what is left
    # layers 6 and 0 cut front to back (their gradient is final in that order), layers 4 and 2 whole
    assert bucket_bounds(spans, 60, split={0, 6}) == [
        Bucket(160, 220, 6, 60), Bucket(220, 280, 6, 120), Bucket(280, 400, 6), Bucket(100, 160, 2),
        Bucket(0, 100, 0)]
    assert bucket_bounds(spans, 40, split={0, 6})[-3:] == [Bucket(100, 160, 2), Bucket(0, 40, 0, 40),
                                                           Bucket(40, 100, 0)]


def test_model_buckets_follow_the_flat_layout():
    model = Sequential(mlp_specs([784, 1024, 1024, 10]), 784)
    assert layer_spans(model.offsets) == {0: (0, 803840), 2: (803840, 1853440), 4: (1853440, 1863690)}
    # 1 MB (262144 values): the 10-way output layer alone (the linear layer below it is cut), then each
    # linear layer's weight rows in 1 MB pieces front to back, its last piece with the rest and the bias
    a, b = 803840, 262144
    assert model_buckets(model, 1.0) == [
        Bucket(1853440, 1863690, 4), Bucket(a, a + b, 2, b), Bucket(a + b, a + 2 * b, 2, 2 * b),
        Bucket(a + 2 * b, a + 3 * b, 2, 3 * b), Bucket(a + 3 * b, 1853440, 2),
        Bucket(0, b, 0, b), Bucket(b, 2 * b, 0, 2 * b), Bucket(2 * b, a, 0)]
    assert sum(b.hi - b.lo for b in model_buckets(model, 1.0)) == model.grads.size


def test_piece_counts_split_a_bucket_over_the_owned_slices():
    n, size = 400, 3
    bounds = [shard(n, q, size) for q in range(size)]
    buckets = bucket_bounds({0: (0, 100), 2: (100, 150), 4: (150, 400)}, 1)
    counts = [piece_counts(b, bounds) for b in buckets]
    assert [sum(c) for c in counts] == [b.hi - b.lo for b in buckets]
    assert np.sum(counts, axis=0).tolist() == shard_counts(n, size)


# ---- the reduction against the blocking collectives ----

@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("sharded", [False, True])
def test_overlapped_buckets_sum_as_one_allreduce(comm, sharded):
    rng = np.random.default_rng(comm.rank)
    model = Sequential(mlp_specs([20, 30, 40, 5]), 20, dtype=np.float64)
    g = rng.standard_normal(model.grads.size)
    owned = slice(*shard(g.size, comm.rank, comm.size)) if sharded else None
    out = np.empty(owned.stop - owned.start) if sharded else g
    red = OverlappedReduction(comm, model_buckets(model, 0.001), owned)
    want = comm.allreduce_sum(g.copy())
    red.begin(g, out)
    for i in reversed(range(len(model.layers))):
        for done in (50, 100, 150):  # a linear layer's first rows final (the layers cut into 0.001 MB buckets)
            red.after_layer(i, done)
        red.after_layer(i)
    assert red.started == len(red.buckets) > 3
    red.wait()
    np.testing.assert_allclose(out, want[owned] if sharded else want, rtol=1e-12, atol=1e-12)


class CountingComm(SerialComm):
    """A world of one that counts the non-blocking reductions started."""
    started = 0

    def iallreduce_sum(self, buf):
        self.started += 1
        return super().iallreduce_sum(buf)


def test_accumulation_reduces_only_on_the_last_pass():
    from distbp.nn.losses import loss_class
    from distbp.training.step import DataParallelStep
    model = Sequential(mlp_specs([6, 8, 8, 3]), 6, dtype=np.float64)
    comm = CountingComm()
    buckets = model_buckets(model, 1e-6)  # one bucket per layer with parameters
    step = DataParallelStep(model, loss_class("cross_entropy")(), comm, overlap=OverlappedReduction(comm, buckets))
    rng = np.random.default_rng(0)
    for k in range(3):
        x, y = rng.standard_normal((4, 6)), rng.integers(0, 3, 4)
        step.forward_backward(x, y, np.arange(4 * k, 4 * k + 4), 12, first=k == 0, last=k == 2)
        assert comm.started == (len(buckets) if k == 2 else 0)


# ---- whole runs ----

def sets_of(tmp_path, *extra):
    """A float64 MLP of three weight layers, small buckets, two passes a step."""
    data = synthetic_file(tmp_path / "data.h5")
    return [f'data.path="{data}"', "train.batch_size=16", "train.accumulate_steps=2", "model.hidden=[16, 12]",
            'train.dtype="float64"', "optim.momentum=0.9", "train.epochs=100", "train.bucket_mb=0.0002", *extra]


@pytest.mark.parametrize("shard_optimizer", ["false", "true"])
def test_overlapped_runs_equal_blocking_runs(serial, tmp_path, shard_optimizer):
    sets = sets_of(tmp_path, f"train.shard_optimizer={shard_optimizer}")
    for n in (1, 2, 4) if shard_optimizer == "false" else (2, 4):  # 1 rank is never sharded
        blocking, _ = train(tmp_path, f"off{n}", n, [*sets, "train.overlap=false"], 20)
        overlapped, log = train(tmp_path, f"on{n}", n, [*sets, "train.overlap=true"], 20)
        kind = "reduce-scatter" if shard_optimizer == "true" else "allreduce"
        # 26 values a bucket: the linear layers cut front to back (6, 4 and 2 pieces, the last 39 values whole)
        assert re.search(rf"overlap: 13 gradient bucket\(s\) .* each {kind} started", log), log
        np.testing.assert_allclose(overlapped, blocking, rtol=1e-12, atol=1e-12 * np.abs(blocking).max(),
                                   err_msg=f"{n} ranks")


def test_deterministic_mode_with_overlap_is_bitwise_at_any_rank_count(serial, tmp_path):
    sets = sets_of(tmp_path, "train.deterministic=true", "train.micro_batch=4", "train.overlap=true",
                   'train.dtype="float32"')
    reference, _ = train(tmp_path, "det1", 1, sets, 20)
    for n in (2, 3, 4):
        params, log = train(tmp_path, f"det{n}", n, sets, 20)
        assert params.tobytes() == reference.tobytes(), f"{n} ranks"
        assert "overlap: not in deterministic mode" in log


def test_backward_calls_after_layer_in_reverse_order_with_final_gradients(monkeypatch):
    monkeypatch.setattr(layers, "PROGRESS_ITEMS", 16)  # the 8 x 8 weights' gradients in parts
    model = Sequential(mlp_specs([6, 8, 8, 3]), 6, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((4, 6))
    out = model.forward(x)
    model.backward(np.ones_like(out), need_dx=False)
    plain = model.grads.copy()
    seen, calls = [], []

    def after(i, done=None):  # layer i's first `done` values (None: all) are final: backward below keeps them
        lo, hi = layer_spans(model.offsets).get(i, (0, 0))
        calls.append((i, done, model.grads[lo:lo + (hi - lo if done is None else done)].copy()))
        if done is None and i not in [j for j, _ in seen]:
            seen.append((i, model.grads.copy()))
    model.zero_grad()
    model.backward(np.ones_like(out), need_dx=False, after_layer=after)
    assert [i for i, _ in seen] == [4, 3, 2, 1, 0]
    for i, g in seen:
        lo, hi = layer_spans(model.offsets).get(i, (0, 0))
        assert np.array_equal(g[lo:hi], model.grads[lo:hi])
    # layer 2's weight rows came in parts (16 values: 2 rows of 8), each final when reported, all before its dx
    parts = [(done, g) for i, done, g in calls if i == 2 and done is not None]
    assert [done for done, _ in parts] == [16, 32, 48, 64]
    lo = layer_spans(model.offsets)[2][0]
    assert all(np.array_equal(g, model.grads[lo:lo + done]) for done, g in parts)
    assert [(i, done) for i, done, _ in calls].index((2, None)) < [i for i, _, _ in calls].index(1)
    np.testing.assert_allclose(model.grads, plain, rtol=1e-13, atol=1e-15)
    assert all(layer.after_grads is None for layer in model.chain.layers)
