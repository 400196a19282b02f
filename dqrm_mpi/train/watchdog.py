"""A stalled rank must not hang the job silently.

``StallWatchdog`` runs a thread on each rank.  Collectives go through ``WatchedCollectives``,
which tells the watchdog which collective the rank waits in and since when.  A rank that
waits in one collective for ``timeout / 4`` seconds prints a warning (step, collective, and
what the other ranks last reported), and after ``timeout`` seconds prints why and ends its
process with EXIT_STALLED; the launcher (mpirun) then ends the whole job.  Time spent
computing, evaluating or writing outside collectives never counts: a slow rank is not stalled,
its peers waiting for it are.

To name the rank that holds everyone up, every rank's thread writes a small heartbeat file
(``OUT/.ranks/rank-NNNNN.json``: host, pid, step, collective, a counter) every few seconds;
a rank stopped (SIGSTOP), swapped out or on a dead host stops updating its file.
"""
from __future__ import annotations

import functools
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

EXIT_STALLED = 124  # as timeout(1)
HEARTBEAT_DIR = ".ranks"


class StallWatchdog:
    """rank: this rank; timeout: seconds one collective may wait before the job is ended
    (> 0); heartbeat_dir: where every rank writes its heartbeat (shared by the ranks)."""

    def __init__(self, rank: int, size: int, timeout: float, heartbeat_dir: Path) -> None:
        self.rank, self.size, self.timeout = rank, size, float(timeout)
        self.step = 0
        self.dir = Path(heartbeat_dir)
        self._poll = min(5.0, self.timeout / 8)
        self._waiting: tuple[str, float] | None = None  # (collective, monotonic start)
        self._beats = 0
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (its counter, when it last changed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dqrm-stall-watchdog", daemon=True)

    def start(self) -> "StallWatchdog":
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # heartbeats are best effort: without them the warning cannot name the peers
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        (self.dir / f"rank-{self.rank:05d}.json").unlink(missing_ok=True)

    @contextmanager
    def waiting(self, collective: str) -> Iterator[None]:
        """Mark this rank as waiting in ``collective`` for the duration of the block."""
        self._waiting = (collective, time.monotonic())
        try:
            yield
        finally:
            self._waiting = None

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        warned = 0
        while not self._stop.wait(self._poll):
            self._write_heartbeat()
            waiting = self._waiting
            if waiting is None:
                warned = 0
                continue
            peers = self._observe_peers()
            collective, since = waiting
            waited = time.monotonic() - since
            if waited >= self.timeout:
                self._say(f"stalled: waited {waited:.0f} s (--stall-timeout {self.timeout:g}) at step {self.step + 1} "
                          f"in {collective} for the other ranks; {peers}; ending the job")
                os._exit(EXIT_STALLED)
            if waited >= (warned + 1) * self.timeout / 4:
                warned += 1
                self._say(f"step {self.step + 1} has waited {waited:.0f} s in {collective} for the other ranks; "
                          f"{peers}; the job ends after {self.timeout:g} s (--stall-timeout)")

    def _say(self, text: str) -> None:
        print(f"[dqrm-train] rank {self.rank}: {text}", file=sys.stderr, flush=True)

    def _write_heartbeat(self) -> None:
        self._beats += 1
        waiting = self._waiting
        beat = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": self.step,
                "collective": waiting[0] if waiting else None, "beat": self._beats}
        path = self.dir / f"rank-{self.rank:05d}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(beat))
            os.replace(tmp, path)
        except OSError:
            pass

    def _observe_peers(self) -> str:
        """Read the other ranks' heartbeats (while this rank waits); returns the ones whose
        heartbeat stopped, then the ones busy outside collectives."""
        now, silent, busy = time.monotonic(), [], []
        for r in range(self.size):
            if r == self.rank:
                continue
            beat = self._read(r)
            if beat is None:
                silent.append(f"rank {r} (no heartbeat in {self.dir})")
                continue
            count, changed = self._seen.get(r, (None, now))
            if count != beat["beat"]:
                self._seen[r] = (beat["beat"], now)
                changed = now
            where = f"rank {r} (host {beat['host']}, pid {beat['pid']}) at step {beat['step'] + 1}"
            if now - changed > 2.5 * self._poll:
                silent.append(f"{where}: no sign of life for {now - changed:.0f} s (stopped, hung or its host down)")
            elif beat["collective"] is None:
                busy.append(f"{where}: not in a collective (computing, or stuck outside the exchange)")
        found = silent + busy
        return "; ".join(found) if found else "every other rank is waiting too"

    def _read(self, rank: int) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / f"rank-{rank:05d}.json").read_text())
        except (OSError, ValueError):
            return None


class WatchedCollectives:
    """A ``Collectives`` whose every call is reported to a ``StallWatchdog`` as it waits."""

    def __init__(self, inner: Any, watchdog: StallWatchdog) -> None:
        self._inner, self._watchdog = inner, watchdog

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._inner, attr)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            name = kwargs.get("name")
            with self._watchdog.waiting(f"{attr}({name!r})" if name else attr):
                return value(*args, **kwargs)
        return call
