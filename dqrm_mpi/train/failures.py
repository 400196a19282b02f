"""Errors a person can act on when one rank of many fails.

The failing rank states its error with its rank, step and the batch's rows (shard file and
row range), as one line; the other ranks, whose collectives then fail with Horovod's "has
been shut down", say that another rank failed and wait a moment before exiting, so that the
failing rank is the one mpirun reports and its message comes first.
"""
from __future__ import annotations

import time

PEER_GRACE_SECONDS = 5.0


class RankFailure(RuntimeError):
    """An error of one rank, stated with the rank and where it happened."""


def is_peer_shutdown(error: BaseException) -> bool:
    """Horovod's error on the ranks that did not fail when another one ended the job."""
    return type(error).__name__ == "HorovodInternalError" or "Horovod has been shut down" in str(error)


def peer_failed(rank: int) -> RankFailure:
    """The error for a rank whose peer failed, raised after a grace period (see module doc)."""
    time.sleep(PEER_GRACE_SECONDS)
    return RankFailure(f"rank {rank}: stopped because another rank failed and ended the job "
                       "(that rank's error is above)")
