"""Learning-rate schedules and batch scaling (train/schedule.py): values at chosen steps, the
reference DLRM's LRPolicyScheduler, and refused combinations naming their options."""
from __future__ import annotations

import math

import pytest

from dqrm_mpi.train.schedule import LRSchedule, scaled_lr


def test_warmup_constant_decay_end_at_chosen_steps():
    s = LRSchedule(warmup_steps=4, decay_start=10, decay_steps=5, decay_power=2.0, end_factor=0.1).resolved(20)
    assert [s.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]  # the first step takes 1/W
    assert [s.factor(i) for i in (4, 9)] == [1.0, 1.0]
    assert s.factor(10) == 1.0  # the decay starts from the full rate
    assert s.factor(12) == pytest.approx(0.1 + 0.9 * (1 - 2 / 5) ** 2)
    assert s.factor(14) == pytest.approx(0.1 + 0.9 * (1 / 5) ** 2)
    assert [s.factor(i) for i in (15, 19)] == [0.1, 0.1]  # kept after the decay


def test_the_reference_dlrm_lr_policy_within_its_decay():
    """dlrm_s_pytorch.py's LRPolicyScheduler: warm-up scale step/W for its step counts 1..W-1,
    decay scale ((D - (step - S)) / D)^2; our step s is its step count s + 1 in the warm-up."""
    warmup, start, steps = 8, 20, 16
    s = LRSchedule(warmup_steps=warmup, decay_start=start, decay_steps=steps).resolved(40)
    for count in range(1, warmup):
        assert s.factor(count - 1) == pytest.approx(1.0 - (warmup - count) / warmup)
    for step in range(start, start + steps):
        assert s.factor(step) == pytest.approx(((steps - (step - start)) / steps) ** 2)


def test_the_decay_defaults_to_the_end_of_the_run():
    s = LRSchedule(decay_steps=30, decay_power=1.0).resolved(100)
    assert s.decay_start == 70 and s.factor(69) == 1.0 and s.factor(85) == pytest.approx(0.5)
    assert LRSchedule().resolved(5).constant and LRSchedule().factor(123) == 1.0


@pytest.mark.parametrize("schedule, total, message", [
    (LRSchedule(warmup_steps=50), 40, r"--lr-warmup-steps \(50\) is longer than the run \(40 steps"),
    (LRSchedule(decay_start=30, decay_steps=20), 40, r"--lr-decay-start \+ --lr-decay-steps \(30 \+ 20\) ends past"),
    (LRSchedule(decay_steps=50), 40, r"--lr-decay-steps \(50\) is longer than the run \(40 steps"),
    (LRSchedule(warmup_steps=10, decay_start=5, decay_steps=5), 40, r"before the warm-up ends \(--lr-warmup-steps 10"),
])
def test_schedules_that_do_not_fit_the_run_are_refused(schedule, total, message):
    with pytest.raises(ValueError, match=message):
        schedule.resolved(total)


@pytest.mark.parametrize("kwargs, message", [
    ({"end_factor": -0.1}, "lr_end must be between 0 and the base"),
    ({"end_factor": 1.5}, "lr_end must be between 0 and the base"),
    ({"decay_start": 3}, "lr_decay_start needs lr_decay_steps"),
    ({"decay_power": 0}, "lr_decay_power must be > 0"),
])
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LRSchedule(**kwargs)


def test_batch_scaling_rules():
    assert scaled_lr(0.1, "none", 4096, 128) == 0.1
    assert scaled_lr(0.1, "linear", 4096, 128) == pytest.approx(3.2)
    assert scaled_lr(0.1, "sqrt", 4096, 128) == pytest.approx(0.1 * math.sqrt(32))
    with pytest.raises(ValueError, match="lr_scaling must be one of"):
        scaled_lr(0.1, "cubic", 4096, 128)
