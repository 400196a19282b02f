"""N ranks simulated by N threads of one process, for unit tests without horovodrun.

``InProcessHorovod`` stands in for the ``horovod.torch`` functions that ``HorovodBackend``
calls, with Horovod's semantics (allgather concatenates dim 0 in rank order, alltoall
returns the received rows in source-rank order and their splits, Average divides the sum
by the world size).  So ``HorovodBackend(InProcessHorovod(rank, rendezvous))`` is the real
backend, with its traffic accounting and part splitting, over simulated ranks:

    results = run_ranks(3, lambda backend: exchange_something(backend))   # rank order

Ranks meet at a ``Rendezvous`` for every call.  Ranks that issue different calls at the
same time (a hang under Horovod) raise instead, as do all ranks when one fails.  As in
Horovod, each rank's collectives run in order on one background thread of its own, so the
``*_async`` calls return at once and ``synchronize(handle)`` waits for the result; the
blocking calls are async + synchronize.  (Horovod matches calls by name and tolerates
ranks enqueueing them in different orders; here the order must agree, which is stricter.)
"""
from __future__ import annotations

import pickle
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import torch

from .backend import HorovodBackend

T = TypeVar("T")


class RankAborted(RuntimeError):
    """Raised on a rank whose peer failed or stopped answering."""


class Rendezvous:
    """Where ``size`` thread ranks meet: each posts its input, and once all have, each
    combines all inputs (rank order) into its own result before anyone posts again."""

    def __init__(self, size: int, timeout: float = 120.0) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._posted: list[tuple[str, Any]] = [("", None)] * size

    def _wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise RankAborted("another rank failed or did not reach this collective in time") from None

    def abort(self) -> None:
        self._barrier.abort()

    def exchange(self, rank: int, call: str, value: Any, combine: Callable[[list[Any]], T]) -> T:
        """Post ``value`` for the collective ``call`` (op and name); returns ``combine(values)``."""
        self._posted[rank] = (call, value)
        self._wait()
        calls = sorted({c for c, _ in self._posted})
        try:
            if len(calls) > 1:
                raise RuntimeError(f"ranks issued different collectives at once: {calls} (Horovod would hang)")
            return combine([v for _, v in self._posted])
        finally:
            self._wait()  # nobody posts the next call while others still read this one


def _check_parts(parts: list[torch.Tensor], name: str, same_dim0: bool) -> None:
    first = parts[0]
    for r, p in enumerate(parts):
        if p.dtype != first.dtype or p.shape[1:] != first.shape[1:] or (same_dim0 and p.shape != first.shape):
            raise ValueError(f"{name}: rank {r} passed {p.dtype} {tuple(p.shape)}, rank 0 {first.dtype} "
                             f"{tuple(first.shape)}")


def _copy(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


class InProcessHorovod:
    """The ``horovod.torch`` functions ``HorovodBackend`` uses, for rank ``rank`` of the
    threads sharing ``rendezvous``.  Results are new tensors (never another rank's)."""

    Average = "Average"

    def __init__(self, rank: int, rendezvous: Rendezvous) -> None:
        self._rank, self._rv = rank, rendezvous
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rank{rank}-collectives")

    def _start(self, op: str, name: str | None, value: Any, combine: Callable[[list[Any]], T]) -> "Future[T]":
        return self._worker.submit(self._rv.exchange, self._rank, f"{op}:{name}", value, combine)

    def _call(self, op: str, name: str | None, value: Any, combine: Callable[[list[Any]], T]) -> T:
        return self.synchronize(self._start(op, name, value, combine))

    @staticmethod
    def synchronize(handle: "Future[T]") -> T:
        """The result of an ``*_async`` call, once every rank's worker has done it."""
        return handle.result()

    # -- process facts -----------------------------------------------------------
    def init(self) -> None:
        pass

    def shutdown(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._rv.size

    local_rank = rank
    local_size = size

    def cuda_built(self) -> bool:
        return False

    # -- collectives ---------------------------------------------------------------
    def grouped_allreduce(self, tensors: list[torch.Tensor], op: str, name: str | None = None) -> list[torch.Tensor]:
        return self.synchronize(self.grouped_allreduce_async(tensors, op, name))

    def grouped_allreduce_async(self, tensors: list[torch.Tensor], op: str, name: str | None = None
                                ) -> "Future[list[torch.Tensor]]":
        if op != self.Average:
            raise NotImplementedError(f"op {op!r}: only Average is simulated")

        def combine(parts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
            out = []
            for i in range(len(parts[0])):
                _check_parts([p[i] for p in parts], f"{name}[{i}]", same_dim0=True)
                total = parts[0][i].clone()
                for p in parts[1:]:
                    total.add_(p[i])
                out.append(total.div_(self._rv.size))
            return out

        return self._start("allreduce", name, list(tensors), combine)

    def _cat(self, parts: list[torch.Tensor], name: str | None) -> torch.Tensor:
        _check_parts(parts, str(name), same_dim0=False)
        return torch.cat(parts)

    def allgather(self, tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
        return self.synchronize(self.allgather_async(tensor, name))

    def allgather_async(self, tensor: torch.Tensor, name: str | None = None) -> "Future[torch.Tensor]":
        return self._start("allgather", name, tensor, lambda parts: self._cat(parts, name))

    def grouped_allgather(self, tensors: list[torch.Tensor], name: str | None = None) -> list[torch.Tensor]:
        return self.synchronize(self.grouped_allgather_async(tensors, name))

    def grouped_allgather_async(self, tensors: list[torch.Tensor], name: str | None = None
                                ) -> "Future[list[torch.Tensor]]":
        return self._start("allgather", name, list(tensors),
                           lambda parts: [self._cat([p[i] for p in parts], name) for i in range(len(parts[0]))])

    def alltoall(self, tensor: torch.Tensor, splits: torch.Tensor, name: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        def combine(parts: list[tuple[torch.Tensor, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
            for r, (t, s) in enumerate(parts):
                if len(s) != self._rv.size or sum(s) != t.shape[0]:
                    raise ValueError(f"{name}: rank {r} splits {s} do not cover its {t.shape[0]} rows "
                                     f"for {self._rv.size} ranks")
            mine = [torch.split(t, s)[self._rank] for t, s in parts]
            return self._cat(mine, name), torch.tensor([m.shape[0] for m in mine], dtype=torch.int32)

        return self._call("alltoall", name, (tensor, [int(x) for x in splits.tolist()]), combine)

    def broadcast(self, tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
        return self._call("broadcast", name, tensor, lambda parts: parts[root_rank].clone())

    def broadcast_object(self, obj: Any, root_rank: int = 0, name: str | None = None) -> Any:
        return self._call("broadcast_object", name, obj, lambda parts: _copy(parts[root_rank]))

    def allgather_object(self, obj: Any, name: str | None = None) -> list[Any]:
        return self._call("allgather_object", name, obj, lambda parts: [_copy(p) for p in parts])

    def barrier(self) -> None:
        self._call("barrier", None, None, lambda parts: None)


def run_ranks(size: int, fn: Callable[[HorovodBackend], T], timeout: float = 120.0) -> list[T]:
    """``fn(backend)`` on ``size`` simulated ranks, each with its own ``HorovodBackend``;
    returns the results in rank order.  The first failure is raised here (its peers stop
    at their next collective)."""
    rendezvous = Rendezvous(size, timeout)
    results: list[Any] = [None] * size
    errors: list[BaseException | None] = [None] * size

    def rank_main(rank: int) -> None:
        hvd = InProcessHorovod(rank, rendezvous)
        try:
            results[rank] = fn(HorovodBackend(hvd))
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            errors[rank] = e
            rendezvous.abort()
        finally:
            hvd.shutdown()

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"rank{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failures = [e for e in errors if e is not None]
    if failures:
        raise next((e for e in failures if not isinstance(e, RankAborted)), failures[0])
    return results
