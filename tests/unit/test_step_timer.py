"""StepTimer: laps split the loop's wall time into named parts; evaluation and
checkpoints stay out of the training time."""
from __future__ import annotations

import time

import pytest

from dqrm_mpi.train.step_timer import TRAIN_PARTS, StepTimer


def test_laps_add_up_to_the_wall_time_and_windows_restart():
    timer = StepTimer()
    start = time.perf_counter()
    timer.restart()
    for _ in timer.timed(iter([1, 2])):
        time.sleep(0.01)
        timer.lap("forward_backward")
        timer.lap("optimizer")
    time.sleep(0.01)
    timer.lap("eval")
    elapsed = time.perf_counter() - start
    assert timer.total["forward_backward"] >= 0.02
    assert timer.train_seconds + timer.total["eval"] <= elapsed  # every lap lies inside the measured span
    assert timer.total["eval"] >= 0.01 and timer.train_seconds < elapsed - 0.01
    window = timer.take_window()
    assert list(window) == list(TRAIN_PARTS) and sum(window.values()) == pytest.approx(timer.train_seconds)
    assert sum(timer.take_window().values()) == 0.0


def test_unknown_part_is_refused():
    with pytest.raises(ValueError, match="unknown step part 'backward'"):
        StepTimer().lap("backward")


def test_step_time_line_names_the_overlap_when_logged():
    from dqrm_mpi.train.report import format_step_time
    parts = {p: 0.001 for p in TRAIN_PARTS}
    base = {**parts, "total": 0.006, "comm_wait": 0.0005, "codec": 0.0002}
    line = format_step_time(base)
    assert "collectives blocked 0.50 ms, codec 0.20 ms" in line and "first start" not in line
    line = format_step_time({**base, "exchange_span": 0.004, "exchange_waited": 0.001})
    assert line.endswith("exchange 4.00 ms from first start to last decode, the step waited 1.00 (25%)")
