"""What rank 0 shows while training: progress on stderr, messages on stdout.

Modes (``--progress``):
  bar   a tqdm bar (loss, communication ms per step) and a nested bar during evaluation;
  log   for job files: every ``interval`` seconds one plain timestamped line
        ``2026-11-27 03:57:03 [dqrm-train] step 1200/306700 (0.4%) epoch 0 loss 0.4521
        12,345 samples/s comm 3.21 ms/step ETA 1:23:45`` and no bars;
  none  no progress;
  auto  bar when stderr is a terminal, else log.
Messages (evaluation results, the summary) go to stdout and are flushed at once, so
under horovodrun they appear when they happen and in order; in log mode they carry a
timestamp too.  The loss and rates of a progress line are rank 0's, since the last line.
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO

from tqdm import tqdm

MODES = ("auto", "bar", "log", "none")


def resolve_mode(mode: str, stream: TextIO | None = None) -> str:
    """``auto`` -> ``bar`` on a terminal, ``log`` otherwise; other modes unchanged."""
    if mode not in MODES:
        raise ValueError(f"progress must be one of {MODES}, got {mode!r}")
    stream = stream or sys.stderr
    if mode == "auto":
        return "bar" if stream.isatty() else "log"
    return mode


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


class Progress:
    """Rank 0's progress and messages (``enabled`` False elsewhere: then it shows nothing)."""

    def __init__(self, mode: str, total: int, initial: int, batch_size: int, interval: float = 60.0,
                 enabled: bool = True, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.mode = resolve_mode(mode, self.err) if enabled else "none"
        self.enabled = enabled
        self.total, self.batch_size, self.interval = total, batch_size, interval
        self.bar = (tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=self.err)
                    if self.mode == "bar" else None)
        self._start_step, self._start_time = initial, time.monotonic()
        self._next_line = self._start_time + interval
        self._since = {"steps": 0, "loss": 0.0, "comm_seconds": 0.0}
        self._step = self._epoch = 0
        self._train_seconds = self._line_train_seconds = 0.0

    @property
    def eval_bars(self) -> bool:
        """Whether evaluation shows a nested bar (bar mode only)."""
        return self.mode == "bar"

    def step(self, step: int, epoch: int, loss: float, comm_seconds: float, train_seconds: float) -> None:
        """After each step: ``loss`` and ``comm_seconds`` of rank 0's step; ``train_seconds`` the
        run's training wall time so far (data wait included, evaluation not)."""
        if self.mode == "none":
            return
        since = self._since
        since["steps"] += 1
        since["loss"] += loss
        since["comm_seconds"] += comm_seconds
        self._step, self._epoch, self._train_seconds = step, epoch, train_seconds
        if self.bar is not None:  # the means since the previous redraw
            self.bar.set_postfix(loss=f"{since['loss'] / since['steps']:.4f}",
                                 comm=f"{since['comm_seconds'] / since['steps'] * 1e3:.1f}ms", refresh=False)
            self.bar.update(1)
            if self.bar.n == self.bar.last_print_n:  # just redrawn
                self._reset()
        elif time.monotonic() >= self._next_line:
            self._line()

    def _reset(self) -> None:
        self._since = dict.fromkeys(self._since, 0)

    def _line(self) -> None:
        since, now = self._since, time.monotonic()
        done = self._step - self._start_step
        eta = (now - self._start_time) / done * (self.total - self._step) if done else 0.0
        seconds = self._train_seconds - self._line_train_seconds
        rate = since["steps"] * self.batch_size / seconds if seconds > 0 else 0.0
        print(f"{timestamp()} [dqrm-train] step {self._step}/{self.total} ({100 * self._step / self.total:.1f}%) "
              f"epoch {self._epoch} loss {since['loss'] / max(since['steps'], 1):.4f} {rate:,.0f} samples/s "
              f"comm {since['comm_seconds'] / max(since['steps'], 1) * 1e3:.2f} ms/step "
              f"ETA {timedelta(seconds=round(eta))}\n", end="", file=self.err, flush=True)
        self._reset()
        self._line_train_seconds = self._train_seconds
        self._next_line = now + self.interval

    def message(self, text: str) -> None:
        """A line (or lines) for the user on stdout, flushed now; timestamped in log mode."""
        if not self.enabled:
            return
        if self.mode == "log":
            text = f"{timestamp()} {text}"
        with tqdm.external_write_mode(file=self.out):  # clears and redraws a bar around the text
            self.out.write(text + "\n")  # one write: mpirun tags each write it forwards
            self.out.flush()

    def close(self) -> None:
        """Close the bar, or write the last log line when steps were made since the previous one."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "log" and self._since["steps"]:
            self._line()
