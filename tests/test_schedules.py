"""Learning-rate schedules: warm-up, constant, step and cosine values by step, and errors naming the key."""
import math

import numpy as np
import pytest

from conftest import import_torch
from distbp.schedules import Plateau, make_schedule


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
    ("linear", {}, "optim.schedule='linear' is not one of constant, step, multistep, exponential, cosine, onecycle, plateau"),
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


# --- each schedule against its torch.optim.lr_scheduler namesake, step by step -------------------------------


def torch_rates(make, steps: int, lr: float) -> list[float]:
    """The learning rate of each of steps optimizer steps under make(optimizer), stepped once per step."""
    torch = import_torch()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched, rates = make(torch.optim.lr_scheduler, opt), []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("kind, kw, make", [
    ("multistep", {"milestones": [3, 7, 20], "gamma": 0.5}, lambda s, o: s.MultiStepLR(o, [3, 7, 20], 0.5)),
    ("exponential", {"gamma": 0.9}, lambda s, o: s.ExponentialLR(o, 0.9)),
    ("step", {"step_size": 4, "gamma": 0.3}, lambda s, o: s.StepLR(o, 4, 0.3)),
    ("cosine", {"min_lr": 0.001}, lambda s, o: s.CosineAnnealingLR(o, 30, 0.001)),
    ("onecycle", {}, lambda s, o: s.OneCycleLR(o, 0.1, total_steps=30, cycle_momentum=False)),
    ("onecycle", {"pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0},
     lambda s, o: s.OneCycleLR(o, 0.1, total_steps=30, pct_start=0.25, div_factor=10, final_div_factor=100,
                               cycle_momentum=False)),
])
def test_schedule_equals_torch_step_by_step(kind, kw, make):
    ours = make_schedule(kind, 0.1, total_steps=30, **kw)
    assert [ours(s) for s in range(30)] == pytest.approx(torch_rates(make, 30, 0.1), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("mode, patience, threshold, cooldown, min_lr", [
    ("min", 2, 1e-4, 0, 0.0), ("max", 1, 0.05, 2, 0.002), ("min", 0, 0.0, 1, 0.0)])
def test_plateau_equals_torch_reduce_lr_on_plateau(mode, patience, threshold, cooldown, min_lr):
    torch = import_torch()
    values = np.random.default_rng(3).random(40).cumsum() % 1.7  # rises, then falls back, again and again
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode, 0.5, patience, threshold, "rel", cooldown, min_lr)
    ours = Plateau(0.1, mode, 0.5, patience, threshold, cooldown, min_lr)
    for v in values:
        theirs.step(v)
        ours.step(float(v))
        assert ours.lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        assert (ours.best, ours.bad, ours.cooldown_left) == (theirs.best, theirs.num_bad_epochs, theirs.cooldown_counter)
    again = Plateau(0.1, mode, 0.5, patience, threshold, cooldown, min_lr)
    again.load(ours.state())
    assert again.state() == ours.state()
