"""One dqrm-prep run per output directory: an exclusive lock on ``OUT/.dqrm-prep.lock``.

``flock`` is held for the run's life and released by the operating system when the
process ends, however it ends (a SIGKILLed run leaves no stale lock).  The file records
who holds it, so a second run is refused with the first one's host and pid.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import OutputError

LOCK_FILE = ".dqrm-prep.lock"


class OutputLock:
    """acquire() raises OutputError when another process holds OUT; release() lets it go."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot create the lock file ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputError(
                f"{self.path.parent}: another dqrm-prep is writing this dataset ({holder}); wait for it to "
                f"finish, or stop it and rerun to resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it has just started"
