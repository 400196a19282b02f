"""One process at a time in a directory: an exclusive ``flock`` on ``DIR/.lock``, held for the
life of the process that takes it and released by the OS when it ends (even by SIGKILL).
The file names the holder (host, pid, command, start time) so a refusal can say who it is.

``flock`` works on local file systems and on NFS (Linux emulates it with POSIX locks since
2.6.12); the lock file itself stays behind and means nothing without a holder.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"


class DirectoryInUseError(ValueError):
    """Another live process holds the directory's lock."""


class DirectoryLock:
    """``directory``'s lock: ``acquire()`` takes it now (creating the directory) or raises
    DirectoryInUseError; ``release()`` (or the process ending) gives it up.

    ``what`` names the directory in messages (e.g. "--out runs/a"); ``lock_file`` is the
    lock's name inside it (tools that share a directory use different names)."""

    def __init__(self, directory: str | os.PathLike, what: str, lock_file: str = LOCK_FILE) -> None:
        self.path = Path(directory) / lock_file
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise DirectoryInUseError(f"{self.what} is in use by another run ({holder}; lock {self.path}): "
                                      "wait for it to end, stop it, or choose another directory") from None
        except BaseException:
            os.close(fd)
            raise
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"pid {h['pid']} on host {h['host']} since {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
