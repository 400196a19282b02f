"""Test hook for the resume tests: ``DQRM_PREP_KILL_AFTER=pieces:N`` (or ``shards:N``) makes
the process SIGKILL itself right after its N-th finished piece (or written shard)."""
from __future__ import annotations

import os
import signal

KILL_ENV = "DQRM_PREP_KILL_AFTER"
_counts: dict[str, int] = {}


def maybe_kill(stage: str) -> None:
    """Count one finished ``stage`` item; kill this process when the hook asks for it."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != stage:
        return
    _counts[stage] = _counts.get(stage, 0) + 1
    if _counts[stage] >= int(n):
        os.kill(os.getpid(), signal.SIGKILL)
