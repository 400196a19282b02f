"""Ranks die with their launcher.

``horovodrun`` (MPI mode) replaces itself with ``/bin/sh -c "mpirun ..."``; a SIGTERM to it
ends that shell only, and mpirun and the ranks ran on, writing ``--out``.  Each rank therefore
watches the launcher processes above it (mpirun / orted / prted / slurmstepd, and the
horovodrun shell above mpirun) and, when one of them is gone, sends itself SIGTERM: the same
signal mpirun gives the ranks when it is stopped (the trainer's own SIGTERM handling, where
it has some, runs; without one the rank ends and mpirun, if alive, ends the others).  A rank
that still lives ``GRACE_SECONDS`` later exits.

Nothing is watched when the parent is not a launcher (``dqrm-train`` started from a shell:
closing that shell must not stop a ``nohup`` run).  Linux only (``/proc``).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

LAUNCHERS = ("mpirun", "mpiexec", "orterun", "orted", "prterun", "prted", "prte", "hydra_pmi_proxy",
             "slurmstepd")
POLL_SECONDS = 1.0
GRACE_SECONDS = 120.0


def _stat(pid: int) -> tuple[str, str, int, str] | None:
    """(command name, state, parent pid, start time) of a live process, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # exited, not yet reaped
        return None
    return comm, fields[0], int(fields[1]), fields[19]


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_horovodrun(pid: int) -> bool:
    """horovodrun itself, or the ``/bin/sh -c "mpirun ..."`` it became."""
    argv = _argv(pid)
    if any(Path(a).name == "horovodrun" for a in argv[:2]):
        return True
    return len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash", "dash") and argv[1] == "-c" \
        and argv[2].lstrip().startswith(("mpirun", "mpiexec"))


def launcher_chain(pid: int | None = None) -> list[tuple[int, str, str]]:
    """[(pid, start time, description)] of the launcher processes above ``pid`` (this process),
    nearest first; empty when the parent is not a launcher."""
    own = _stat(pid or os.getpid())
    if own is None:
        return []
    parent = own[2]
    info = _stat(parent)
    if info is None or info[0] not in LAUNCHERS:
        return []
    chain = [(parent, info[3], info[0])]
    above = info[2]
    while above > 1:
        info = _stat(above)
        if info is None or not _is_horovodrun(above):
            break
        chain.append((above, info[3], " ".join(_argv(above))[:80]))
        above = info[2]
    return chain


class LauncherWatch:
    """A thread that sends this process SIGTERM when a process of ``launcher_chain()`` ends."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.chain = launcher_chain() if sys.platform.startswith("linux") else []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dqrm-launcher-watch", daemon=True)

    def start(self) -> "LauncherWatch":
        if self.chain:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            for pid, started, what in self.chain:
                info = _stat(pid)
                if info is None or info[3] != started:
                    print(f"[dqrm-train] rank {self.rank}: its launcher (pid {pid}, {what}) has ended: "
                          "ending this rank (SIGTERM)", file=sys.stderr, flush=True)
                    os.kill(os.getpid(), signal.SIGTERM)
                    if not self._stop.wait(GRACE_SECONDS):
                        os._exit(128 + signal.SIGTERM)
                    return
