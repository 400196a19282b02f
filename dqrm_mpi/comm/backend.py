"""Horovod backend: the one module that imports Horovod.

``HorovodBackend`` implements ``collectives.Collectives``.  Every collective goes through
here so that its bytes and seconds are counted in ``self.traffic`` from the tensors
actually handed to Horovod.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .traffic import TrafficMeter


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class Inflight:
    """A started collective: ``finish()`` blocks until it is done and returns (bytes received
    from other ranks, the result).  Pass it to ``HorovodBackend.wait``."""

    kind: str
    collective: str
    finish: Callable[[], tuple[int, Any]]
    counted: bool = True  # False: nothing was handed to Horovod (no tensors), nothing to count


def _nothing(kind: str, collective: str) -> Inflight:
    """A collective over no tensors: nothing to send, an empty result, no traffic."""
    return Inflight(kind, collective, lambda: (0, []), counted=False)


class HorovodBackend:
    """Initialises Horovod (``hvd.init()``) and wraps the collectives we use.

    Works in a plain process too (world size 1), which is what single-rank runs get.
    ``hvd``: the ``horovod.torch`` module (default) or a stand-in with the same functions,
    e.g. ``inprocess.InProcessHorovod`` (one of N ranks simulated by threads).
    """

    def __init__(self, hvd: Any = None) -> None:
        if hvd is None:
            try:
                import horovod.torch as hvd
            except ImportError as e:  # `pip install .` alone does not build Horovod
                raise ImportError(f"{e}: dqrm_mpi needs Horovod 0.28.1 built with PyTorch and MPI; run "
                                  "launch/install.sh (it builds Horovod against torch 2.x: C++17 patch, "
                                  "MPI + Gloo)") from e

        hvd.init()
        self._hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()
        self.local_rank = hvd.local_rank()
        self.local_size = hvd.local_size()
        self.traffic = TrafficMeter()
        # Horovod built for CPU only cannot take CUDA tensors: stage them through host memory.
        self._host_staging = not hvd.cuda_built()

    # -- helpers ----------------------------------------------------------
    def _to_comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.cpu() if (self._host_staging and t.is_cuda) else t

    @staticmethod
    def _like(result: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return result.to(ref.device) if result.device != ref.device else result

    # -- collectives --------------------------------------------------------
    # Each step collective comes as ``*_start`` (enqueue, returns an ``Inflight``) and ``wait``
    # (block until done, return the result); the blocking form is start + wait.  Traffic:
    # ``sent`` and the enqueue seconds are recorded at start (with the call), ``received`` and
    # the seconds blocked in ``wait`` at wait: a collective's seconds are the time the calling
    # thread spent enqueueing it plus the time it spent blocked waiting for it (not the time
    # the transfer took while the caller did something else).
    def allreduce_start(self, tensors: list[torch.Tensor], name: str, kind: str) -> "Inflight":
        """Start averaging float tensors across ranks in one grouped negotiation."""
        if not tensors:
            return _nothing(kind, "allreduce")
        for t in tensors:
            if not t.is_floating_point():
                raise TypeError(f"{name}: allreduce is for float tensors, got {t.dtype}: never sum quantized integers")
        start = time.perf_counter()
        handle = self._hvd.grouped_allreduce_async([self._to_comm(t) for t in tensors], op=self._hvd.Average,
                                                   name=name)
        size = sum(_nbytes(t) for t in tensors)
        self.traffic.record(kind, "allreduce", size, 0, time.perf_counter() - start)

        def finish() -> tuple[int, list[torch.Tensor]]:
            return size, [self._like(o, t) for o, t in zip(self._hvd.synchronize(handle), tensors)]

        return Inflight(kind, "allreduce", finish)

    def allgather_start(self, tensors: list[torch.Tensor], name: str, kind: str) -> "Inflight":
        """Start gathering each tensor from every rank (dim 0 may differ); ``wait`` returns
        [tensor][rank] parts.  The dim-0 counts travel in a second collective started at once."""
        if not tensors:
            return _nothing(kind, "allgather")
        start = time.perf_counter()
        # Dim-0 sizes per rank, to split the gathered result back into per-rank parts.
        counts = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64)
        counts_handle = self._hvd.allgather_async(counts.unsqueeze(0), name=f"{name}.counts")  # [size, k]
        handle = self._hvd.grouped_allgather_async([self._to_comm(t) for t in tensors], name=name)
        own = sum(_nbytes(t) for t in tensors) + _nbytes(counts)
        self.traffic.record(kind, "allgather", own, 0, time.perf_counter() - start)

        def finish() -> tuple[int, list[list[torch.Tensor]]]:
            all_counts = self._hvd.synchronize(counts_handle)
            gathered = self._hvd.synchronize(handle)
            total = sum(_nbytes(g) for g in gathered) + _nbytes(all_counts)
            return total - own, [[self._like(p, t) for p in torch.split(g, all_counts[:, i].tolist(), dim=0)]
                                 for i, (g, t) in enumerate(zip(gathered, tensors))]

        return Inflight(kind, "allgather", finish)

    def allgather_stacked_start(self, tensor: torch.Tensor, name: str, kind: str) -> "Inflight":
        """Start gathering a tensor of the same shape from every rank; ``wait`` returns
        [size, *shape] in rank order (one collective: no dim-0 counts to exchange)."""
        start = time.perf_counter()
        handle = self._hvd.allgather_async(self._to_comm(tensor.unsqueeze(0)), name=name)
        own = _nbytes(tensor)
        self.traffic.record(kind, "allgather", own, 0, time.perf_counter() - start)

        def finish() -> tuple[int, torch.Tensor]:
            gathered = self._hvd.synchronize(handle)
            return _nbytes(gathered) - own, self._like(gathered, tensor)

        return Inflight(kind, "allgather", finish)

    def wait(self, inflight: "Inflight") -> Any:
        """Block until a started collective is done; its result (as the blocking call's)."""
        start = time.perf_counter()
        received, result = inflight.finish()
        if inflight.counted:
            self.traffic.record(inflight.kind, inflight.collective, 0, received, time.perf_counter() - start,
                                calls=0)
        return result

    def allreduce_average(self, tensors: list[torch.Tensor], name: str, kind: str) -> list[torch.Tensor]:
        """Average float tensors across ranks in one grouped negotiation."""
        return self.wait(self.allreduce_start(tensors, name, kind))

    def allgather(self, tensors: list[torch.Tensor], name: str, kind: str) -> list[list[torch.Tensor]]:
        """Gather each tensor from every rank (dim 0 may differ); returns [tensor][rank] parts."""
        return self.wait(self.allgather_start(tensors, name, kind))

    def allgather_stacked(self, tensor: torch.Tensor, name: str, kind: str) -> torch.Tensor:
        """Gather a tensor of the same shape from every rank: [size, *shape], rank order, one
        collective (fixed-size packed payloads: no dim-0 counts to exchange)."""
        return self.wait(self.allgather_stacked_start(tensor, name, kind))

    def alltoall(self, tensor: torch.Tensor, splits: list[int], name: str, kind: str) -> tuple[torch.Tensor, list[int]]:
        """Send ``splits[r]`` rows of ``tensor`` to rank r; returns (received rows, rows per source rank)."""
        start = time.perf_counter()
        received, received_splits = self._hvd.alltoall(
            self._to_comm(tensor), splits=torch.tensor(splits, dtype=torch.int32), name=name)
        elapsed = time.perf_counter() - start
        row = _nbytes(tensor[:1]) if tensor.shape[0] else 0
        rsplits = received_splits.tolist()
        self.traffic.record(kind, "alltoall", row * (sum(splits) - splits[self.rank]),
                            row * (sum(rsplits) - rsplits[self.rank]), elapsed)
        return self._like(received, tensor), rsplits

    # -- set-up and bookkeeping (not counted as step traffic) ---------------
    def broadcast_module(self, module: torch.nn.Module, root: int = 0) -> None:
        """Copy every parameter and buffer of ``module`` from ``root`` to all ranks.

        Goes through ``load_state_dict`` so that modules which mirror buffers into Python
        state (QAT flags) see the broadcast values as they would a loaded checkpoint.
        """
        state = {
            name: self._like(self._hvd.broadcast(self._to_comm(value), root, name=f"bcast.{name}"), value)
            if value.numel() else value
            for name, value in module.state_dict().items()
        }
        module.load_state_dict(state)

    def broadcast_object(self, obj: Any, root: int = 0, name: str = "object") -> Any:
        return self._hvd.broadcast_object(obj, root_rank=root, name=name)

    def allgather_object(self, obj: Any, name: str = "object") -> list[Any]:
        return self._hvd.allgather_object(obj, name=name)

    def allgather_array(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """Concatenate ``t`` (dim 0 may differ) from all ranks in rank order (evaluation)."""
        return self._like(self._hvd.allgather(self._to_comm(t), name=name), t)

    def barrier(self) -> None:
        self._hvd.barrier()

    def shutdown(self) -> None:
        self._hvd.shutdown()


def usable_cores() -> set[int]:
    """The CPUs this process may run on (its affinity: a SLURM allocation, a binding, taskset)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def fair_share(mine: set[int], others: list[set[int]]) -> int:
    """This rank's share of the cores it may use: each core counts 1/k when k of the ranks
    on this node (``others``, this rank included) may use it.  Ranks sharing one set of n
    cores get n / ranks each; ranks bound to cores of their own keep all of theirs."""
    return max(1, int(sum(1 / max(1, sum(c in s for s in others)) for c in mine) + 1e-9))


def core_share(backend: "HorovodBackend") -> int:
    """This rank's fair share of the cores it may use among the ranks on its node (a
    collective: every rank calls it)."""
    mine = usable_cores()
    node = socket.gethostname()
    posts = backend.allgather_object((node, sorted(mine)), name="threads") if backend.size > 1 else [(node, mine)]
    return fair_share(mine, [set(cores) for host, cores in posts if host == node])


def default_threads(backend: "HorovodBackend", share: int | None = None) -> int:
    """Torch threads per rank: OMP_NUM_THREADS if set, else this rank's share of the cores
    (``share``, or ``core_share(backend)``: then a collective, every rank calls it)."""
    share = core_share(backend) if share is None else share
    env = os.environ.get("OMP_NUM_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS={env!r} is not an integer") from None
    return share
