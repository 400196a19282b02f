"""Where a training step's wall time goes, by named part.

The loop calls ``lap(part)`` after each part of a step: the seconds since the previous lap
go to that part.  Laps run back to back, so the parts add up to the wall time of the
training loop, data wait included:

  data              waiting for the next batch (and moving it to the device)
  scale_pass        QAT's full-table embedding scale refresh (every --scale-period steps)
  forward_backward  forward (with fake quantization) and backward; with --overlap also the
                    encoding and starting of the exchange's buckets inside backward's hooks
  exchange          the finite check and the gradient exchange after backward: waiting on
                    collectives and codec (their shares are the traffic meter's comm_seconds
                    and codec_seconds; its waited_seconds is this part plus the encoding done in backward)
  optimizer         the SGD step
  other             activation-scale averaging, the loss check, logging and its gathers

and, outside the training time, ``eval`` and ``checkpoint``.  On a GPU each lap first
waits for the device, so a part holds the kernels it queued.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Iterable, Iterator, TypeVar

import torch

TRAIN_PARTS = ("data", "scale_pass", "forward_backward", "exchange", "optimizer", "other")
OTHER_PARTS = ("eval", "checkpoint")
T = TypeVar("T")


class StepTimer:
    """Seconds per part, for the whole run and for the open logging window."""

    def __init__(self, device: torch.device | None = None) -> None:
        self._cuda = device is not None and device.type == "cuda"
        self._last = time.perf_counter()
        self.total: dict[str, float] = defaultdict(float)
        self.window: dict[str, float] = defaultdict(float)

    def lap(self, part: str) -> None:
        """The seconds since the previous lap go to ``part``."""
        if part not in TRAIN_PARTS and part not in OTHER_PARTS:
            raise ValueError(f"unknown step part {part!r}: one of {TRAIN_PARTS + OTHER_PARTS}")
        if self._cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.total[part] += seconds
        self.window[part] += seconds

    def restart(self) -> None:
        """Start the next lap now, counting the time since the last lap nowhere (set-up)."""
        self._last = time.perf_counter()

    def timed(self, batches: Iterable[T], part: str = "data") -> Iterator[T]:
        """``batches`` with the wait for each item lapped as ``part``."""
        for item in batches:
            self.lap(part)
            yield item

    def take_window(self) -> dict[str, float]:
        """Seconds per training part since the last call (every part present); starts a new window."""
        window, self.window = self.window, defaultdict(float)
        return {p: window[p] for p in TRAIN_PARTS}

    @property
    def train_seconds(self) -> float:
        """Wall time of the training steps so far, data wait included (evaluation and checkpoints not)."""
        return sum(self.total[p] for p in TRAIN_PARTS)
