"""Writing files safely: through a temporary name then renamed, readable like any file the
user creates (mode 0666 less the umask, not mkstemp's 0600), and a full disk reported with
the path, the bytes needed and the bytes free instead of a bare ENOSPC traceback."""
from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, BinaryIO

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space (or quota) left for ``path``: ``needed`` bytes to write, ``free`` bytes available."""

    def __init__(self, path: str | os.PathLike, needed: int | None, free: int | None) -> None:
        need = f"needs about {_mb(needed)}" if needed is not None else "needs more space"
        have = f", {_mb(free)} free on that file system" if free is not None else ""
        super().__init__(errno.ENOSPC, f"{path}: no space left on the device ({need}{have}); "
                                       "free some space or write elsewhere")
        self.path, self.needed, self.free = Path(path), needed, free

    def __str__(self) -> str:
        return self.strerror


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged user may still write on ``path``'s file system (None if unknown)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_space(path: str | os.PathLike, needed: int) -> None:
    """Raise DiskFullError before writing ``needed`` bytes to ``path`` when they cannot fit."""
    free = free_bytes(Path(path).parent)
    if free is not None and needed > free:
        raise DiskFullError(path, needed, free)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None], needed: int,
                 before_replace: Callable[[], None] | None = None) -> None:
    """Write ``path`` by calling ``write(f)`` on a temporary file beside it, then rename it into
    place: a reader sees the old file or the new one, never part of one.  ``needed`` (bytes,
    an estimate is fine) is checked against the free space first and named if the disk fills
    up anyway; on any failure the temporary file is removed and ``path`` is left as it was.
    ``before_replace()`` runs once the temporary file is complete, just before the rename (to
    keep the old file under another name).  A directory that does not exist is named as given
    (FileNotFoundError), not through the temporary name."""
    path = Path(path)
    if not path.parent.is_dir():
        problem = "is not a directory" if path.parent.exists() else "does not exist"
        raise FileNotFoundError(f"{path}: the directory {path.parent} {problem}")
    check_space(path, needed)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:  # mode 0666 & ~umask, like any file the user creates
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL and not isinstance(e, DiskFullError):
            raise DiskFullError(path, needed, free_bytes(path.parent)) from None
        raise


def write_atomic_bytes(path: str | os.PathLike, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data), len(data))


def append_line(fd: int, path: str | os.PathLike, line: bytes) -> None:
    """Append one whole line to the O_APPEND file ``fd`` (of ``path``), or nothing: a write cut
    short by a full disk is cut off again, so the file never ends in half a line."""
    size = os.fstat(fd).st_size
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        os.ftruncate(fd, size)
        if e.errno in DISK_FULL:
            raise DiskFullError(path, len(line), free_bytes(Path(path).parent)) from None
        raise
