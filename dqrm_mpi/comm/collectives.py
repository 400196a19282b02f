"""The collectives the gradient exchanges, evaluation and the training loop use.

Library code types against ``Collectives``; ``backend.HorovodBackend`` implements it over
Horovod, and over ``inprocess.InProcessHorovod`` (N ranks as threads of one process) in
the unit tests.  ``name`` identifies one collective call: every rank issues the same calls,
with the same names, in the same order.  ``kind`` ("emb", "mlp", "qat", ...) labels the
call's bytes and seconds in ``traffic`` (see ``traffic.py``); the set-up and bookkeeping
collectives (broadcasts, object gathers, evaluation) are not counted.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from .traffic import TrafficMeter


class Collectives(Protocol):
    rank: int
    size: int
    local_rank: int
    local_size: int
    traffic: TrafficMeter

    # -- step traffic (counted in ``traffic``) -------------------------------------------
    def allreduce_average(self, tensors: list[torch.Tensor], name: str, kind: str) -> list[torch.Tensor]:
        """Float tensors averaged over ranks, one grouped call (never integers)."""

    def allgather(self, tensors: list[torch.Tensor], name: str, kind: str) -> list[list[torch.Tensor]]:
        """Each tensor from every rank (dim 0 may differ): [tensor][rank] parts, rank order."""

    def allgather_stacked(self, tensor: torch.Tensor, name: str, kind: str) -> torch.Tensor:
        """A tensor of the same shape from every rank: [size, *shape], rank order."""

    # the same three, started without blocking (e.g. from a backward hook): ``wait`` returns
    # the blocking call's result.  Their seconds in ``traffic`` are enqueue time plus the time
    # blocked in ``wait``; their bytes are recorded at start (sent) and at ``wait`` (received).
    def allreduce_start(self, tensors: list[torch.Tensor], name: str, kind: str) -> Any:
        """Start ``allreduce_average``; a handle for ``wait``."""

    def allgather_start(self, tensors: list[torch.Tensor], name: str, kind: str) -> Any:
        """Start ``allgather`` (the dim-0 counts travel in a second collective started with it)."""

    def allgather_stacked_start(self, tensor: torch.Tensor, name: str, kind: str) -> Any:
        """Start ``allgather_stacked``."""

    def wait(self, handle: Any) -> Any:
        """Block until the started collective is done; its result."""

    def alltoall(self, tensor: torch.Tensor, splits: list[int], name: str, kind: str) -> tuple[torch.Tensor, list[int]]:
        """Send ``splits[r]`` rows to rank r: (received rows in source-rank order, rows per source rank)."""

    # -- set-up, evaluation and bookkeeping (not counted) ----------------------------------
    def broadcast_module(self, module: torch.nn.Module, root: int = 0) -> None:
        """Every parameter and buffer of ``module`` from ``root`` to all ranks, in place."""

    def broadcast_object(self, obj: Any, root: int = 0, name: str = "object") -> Any:
        """``root``'s picklable ``obj`` on every rank."""

    def allgather_object(self, obj: Any, name: str = "object") -> list[Any]:
        """Every rank's picklable ``obj``, rank order."""

    def allgather_array(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """``t`` of every rank (dim 0 may differ) concatenated in rank order."""

    def barrier(self) -> None:
        """Return once every rank has called it."""
