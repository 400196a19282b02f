"""Progress: plain timestamped lines for job files, nothing nested, messages flushed at once."""
from __future__ import annotations

import io
import re

import pytest

from dqrm_mpi.train.progress import Progress, resolve_mode

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def test_log_mode_writes_one_plain_line_per_interval():
    out, err = io.StringIO(), io.StringIO()
    progress = Progress("auto", total=10, initial=4, batch_size=100, interval=0.0, out=out, err=err)
    assert progress.mode == "log" and not progress.eval_bars  # auto on a pipe (not a terminal)
    progress.step(5, 0, loss=0.5, comm_seconds=0.002, train_seconds=0.5)
    progress.step(6, 0, loss=0.3, comm_seconds=0.004, train_seconds=1.0)
    progress.message("[dqrm-train] step 6 epoch 0 test: auc 0.7")
    progress.close()
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue() and "\x1b" not in err.getvalue()
    assert len(lines) == 2
    assert re.fullmatch(STAMP + r" \[dqrm-train\] step 5/10 \(50\.0%\) epoch 0 loss 0\.5000 200 samples/s "
                        r"comm 2\.00 ms/step ETA \d+:\d\d:\d\d", lines[0]), lines[0]
    assert "step 6/10 (60.0%)" in lines[1] and "loss 0.3000 200 samples/s comm 4.00 ms/step" in lines[1]
    assert re.fullmatch(STAMP + r" \[dqrm-train\] step 6 epoch 0 test: auc 0\.7\n", out.getvalue())


def test_lines_wait_for_the_interval_and_close_writes_the_last():
    err = io.StringIO()
    progress = Progress("log", total=3, initial=0, batch_size=10, interval=3600, out=io.StringIO(), err=err)
    for step in (1, 2, 3):
        progress.step(step, 0, loss=float(step), comm_seconds=0.0, train_seconds=float(step))
    assert err.getvalue() == ""
    progress.close()
    assert "step 3/3 (100.0%)" in err.getvalue() and "loss 2.0000" in err.getvalue()  # mean over steps 1-3


@pytest.mark.parametrize("enabled, mode, shown", [(True, "none", True), (False, "log", False)])
def test_none_and_other_ranks(enabled, mode, shown):
    out, err = io.StringIO(), io.StringIO()
    progress = Progress(mode, total=2, initial=0, batch_size=1, interval=0.0, enabled=enabled, out=out, err=err)
    progress.step(1, 0, loss=1.0, comm_seconds=0.0, train_seconds=1.0)
    progress.message("hello")
    progress.close()
    assert err.getvalue() == "" and out.getvalue() == ("hello\n" if shown else "")


def test_bar_mode_and_bad_mode():
    assert resolve_mode("bar", io.StringIO()) == "bar"
    out, err = io.StringIO(), io.StringIO()
    progress = Progress("bar", total=2, initial=0, batch_size=1, out=out, err=err)
    assert progress.eval_bars
    for step in (1, 2):
        progress.step(step, 0, loss=0.25, comm_seconds=0.001, train_seconds=float(step))
    progress.message("between")
    progress.close()
    assert out.getvalue() == "between\n" and "2/2" in err.getvalue() and "loss=0.2500" in err.getvalue()
    with pytest.raises(ValueError, match="progress must be one of"):
        resolve_mode("fancy")
