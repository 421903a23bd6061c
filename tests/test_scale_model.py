"""scripts/scale_model.py: the alpha-beta allreduce cost, the overlapped step and the link fit (no MPI, no timing)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from scale_model import allreduce_s, fit_link, step_s  # noqa: E402

BW, ALPHA = 1e9, 1e-5


def test_allreduce_cost_is_ring_bandwidth_plus_the_cheaper_latency_term():
    assert allreduce_s(8e6, 1, BW, ALPHA) == 0
    assert allreduce_s(8e6, 2, BW, ALPHA) == pytest.approx(2 * ALPHA + 8e6 / BW)
    # 64 ranks: recursive halving/doubling's 2 log2(64) messages, not the ring's 2 * 63
    assert allreduce_s(8e6, 64, BW, ALPHA) == pytest.approx(12 * ALPHA + 2 * 63 / 64 * 8e6 / BW)


def test_overlap_hides_what_fits_behind_the_rest_of_the_backward():
    fwd, bwd, opt = 0.010, 0.020, 0.003
    blocking = step_s(fwd, bwd, opt, [(4e6, 0.5), (4e6, 1.0)], 2, BW, ALPHA, False)
    assert blocking == pytest.approx(fwd + bwd + opt + allreduce_s(8e6, 2, BW, ALPHA))
    # one bucket ready at the end: nothing to hide
    assert step_s(fwd, bwd, opt, [(8e6, 1.0)], 2, BW, ALPHA, True) == pytest.approx(blocking)
    # the first bucket (4 ms) travels during the second half of the backward (10 ms): only the last is exposed
    overlapped = step_s(fwd, bwd, opt, [(4e6, 0.5), (4e6, 1.0)], 2, BW, ALPHA, True)
    assert overlapped == pytest.approx(fwd + bwd + opt + allreduce_s(4e6, 2, BW, ALPHA))
    # buckets share one link: a slow link queues the second behind the first
    slow = step_s(fwd, bwd, opt, [(4e6, 0.5), (4e6, 1.0)], 2, BW / 10, ALPHA, True)
    assert slow == pytest.approx(fwd + 0.5 * bwd + 2 * allreduce_s(4e6, 2, BW / 10, ALPHA) + opt)


def test_link_fit_recovers_bandwidth_and_latency():
    sizes = [2**13, 2**17, 2**20, 2**23]
    for p in (2, 3, 8):
        times = [allreduce_s(n, p, BW, ALPHA) for n in sizes]
        bw, alpha = fit_link(sizes, times, p)
        assert bw == pytest.approx(BW, rel=1e-6) and alpha == pytest.approx(ALPHA, rel=1e-6)


def test_buckets_of_w1_cover_the_gradient_and_are_ready_in_reduction_order():
    from scale_model import buckets_of
    buckets = buckets_of("W1-rep-ovl", rows=16)
    assert sum(b for b, _ in buckets) == 1863690 * 4  # every float32 gradient value once
    ready = [r for _, r in buckets]
    assert ready == sorted(ready) and ready[-1] == 1.0 and 0 < ready[0] < 1
    # the pieces of the cut 1024 x 1024 layer are ready before its dx product, half-way through its backward
    assert len(buckets) == 8 and ready[4] < ready[5]
