"""Stopping a run cleanly (SIGUSR1/SIGTERM) and deciding when to checkpoint, the same way
on every rank.

A signal reaches the ranks at different steps (or only one of them), and rank 0's clock
decides the time-based checkpoints, so neither can be acted on where it is seen: every
``agree_every`` steps each rank posts (signal seen, checkpoint due by rank 0's clock) in
one small object gather, and every rank acts on the same combined answer at the same
step.  On a stop, rank 0 writes ``checkpoint.pt`` and every rank exits with
``PREEMPTED_EXIT`` (launch/train.sbatch requeues the job on it; the requeued job passes
``--resume auto``).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType

from ..comm.collectives import Collectives

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"; every rank exits with it after a stop
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
AGREE_EVERY = 10  # steps between agreements: a signal is acted on within this many steps


class Preempted(Exception):
    """Raised on every rank once the run has stopped at ``step`` (checkpoint written)."""

    def __init__(self, step: int, signal_name: str, checkpoint: str) -> None:
        super().__init__(f"[dqrm-train] {signal_name}: stopped at step {step}, checkpoint {checkpoint}; "
                         f"exiting with code {PREEMPTED_EXIT} (continue with --resume auto)")
        self.step = step


class StopSignals:
    """While entered, SIGUSR1 and SIGTERM record their name in ``received`` instead of ending
    the process (the loop stops at the next agreement).  Signal handlers belong to the main
    thread: entered elsewhere (ranks simulated by threads) it installs nothing."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


@dataclass(frozen=True)
class Decision:
    """What every rank does after a step: write a checkpoint, and/or stop (after writing one)."""

    checkpoint: bool
    stop: str | None  # the signal's name (as seen by the lowest rank that saw one), None: go on


class CheckpointSchedule:
    """Decides after every step, identically on all ranks, whether to checkpoint or stop.

    checkpoint_every: steps between checkpoints (0: off).  checkpoint_seconds: wall time
    between checkpoints by rank 0's clock (0: off), checked at agreements.  With one rank
    the agreement is local and happens after every step.
    """

    def __init__(self, backend: Collectives, signals: StopSignals, checkpoint_every: int,
                 checkpoint_seconds: float, agree_every: int = AGREE_EVERY) -> None:
        self.backend, self.signals = backend, signals
        self.checkpoint_every, self.checkpoint_seconds = checkpoint_every, checkpoint_seconds
        self.agree_every = agree_every if backend.size > 1 else 1
        self.last_saved = time.monotonic()

    def saved(self) -> None:
        """A checkpoint was written now: the time-based interval starts again."""
        self.last_saved = time.monotonic()

    def after_step(self, step: int) -> Decision:
        """Collective every ``agree_every`` steps: every rank must call it after every step."""
        periodic = bool(self.checkpoint_every) and step % self.checkpoint_every == 0
        if step % self.agree_every:
            return Decision(periodic, None)
        due = (self.backend.rank == 0 and self.checkpoint_seconds > 0
               and time.monotonic() - self.last_saved >= self.checkpoint_seconds)
        mine = (self.signals.received, due)
        posts = self.backend.allgather_object(mine, name="lifecycle") if self.backend.size > 1 else [mine]
        stop = next((seen for seen, _ in posts if seen), None)
        return Decision(periodic or posts[0][1] or stop is not None, stop)


def exit_all_ranks(backend: Collectives, code: int = PREEMPTED_EXIT) -> None:
    """End this rank's process now with ``code``, as every rank does at the same moment:
    after a barrier, without Python's slow teardown, and deaf to the SIGTERM with which
    mpirun or srun end the other ranks once one has exited non-zero, so that the launcher
    sees ``code`` from every rank (mpirun reports the first non-zero code, srun the highest)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if backend.size > 1:
        backend.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
