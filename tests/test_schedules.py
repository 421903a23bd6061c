"""Learning-rate schedules: warm-up, constant, step and cosine values by step, and errors naming the key."""
import math

import pytest

from distbp.schedules import make_schedule


def test_schedule_constant_and_step():
    constant = make_schedule("constant", 0.1, total_steps=100)
    assert [constant(s) for s in (0, 50, 10**6)] == [0.1, 0.1, 0.1]
    step = make_schedule("step", 0.1, total_steps=100, step_size=10, gamma=0.5)
    assert [step(s) for s in (0, 9, 10, 19, 20, 35)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.0125])


def test_schedule_cosine():
    cos = make_schedule("cosine", 0.1, total_steps=100, min_lr=0.01)
    assert cos(0) == pytest.approx(0.1)
    assert cos(50) == pytest.approx(0.055)
    assert cos(25) == pytest.approx(0.01 + 0.09 * (1 + math.cos(math.pi / 4)) / 2)
    assert cos(100) == pytest.approx(0.01) and cos(500) == pytest.approx(0.01)


def test_schedule_warmup_then_decay_counts_from_warmup_end():
    cos = make_schedule("cosine", 0.2, total_steps=14, warmup_steps=4)
    assert [cos(s) for s in range(5)] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2])
    assert cos(9) == pytest.approx(0.1)  # half-way through the 10 decay steps
    assert cos(14) == pytest.approx(0.0)
    step = make_schedule("step", 1.0, total_steps=0, warmup_steps=2, step_size=3, gamma=0.1)
    assert [step(s) for s in range(9)] == pytest.approx([0.5, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.01])
    assert isinstance(step(3), float)


@pytest.mark.parametrize("kind, kw, match", [
    ("linear", {}, "optim.schedule='linear' is not one of constant, step, cosine"),
    ("cosine", {"warmup_steps": 10}, r"more total steps \(10\) than optim.warmup_steps=10"),
    ("constant", {"warmup_steps": -1}, "optim.warmup_steps=-1"),
    ("step", {"step_size": 0}, "optim.step_size=0 must be >= 1"),
    ("step", {"gamma": 0.0}, "optim.gamma=0.0 must be > 0"),
    ("cosine", {"min_lr": 1.0}, r"optim.min_lr=1.0 must be in \[0, optim.lr=0.1\]"),
])
def test_schedule_errors(kind, kw, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(kind, 0.1, total_steps=10, **kw)


def test_schedule_rejects_nonpositive_lr():
    with pytest.raises(ValueError, match="optim.lr=0.0 must be > 0"):
        make_schedule("constant", 0.0, total_steps=10)
