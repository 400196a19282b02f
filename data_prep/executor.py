"""Running the pipeline's tasks: in-process, on a pool of worker processes, or across
MPI ranks (``mpirun -np K dqrm-prep criteo ...`` or ``srun --mpi=pmix ...``; every rank
runs its share of each stage with its own pool, results are all-gathered, the output
directory must be on a file system every rank sees)."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Mapping, Sequence

from tqdm import tqdm

from .errors import PrepError


# Set for every process an MPI launcher starts (Open MPI's mpirun, MPICH/Hydra, PMIx).
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def launched_world_size(env: Mapping[str, str] = os.environ) -> tuple[int, str | None]:
    """How many processes the launcher started together with this one, and the variable
    that says so: (1, None) outside a launcher.

    srun sets ``SLURM_STEP_NUM_TASKS`` (with ``SLURM_PROCID``) in every task of a step, with
    or without an MPI plugin, and SLURM's PMIx plugin sets no ``PMIX_SIZE``.  ``SLURM_NTASKS``
    is not read: a batch script's own shell has it too (the allocation's task count).
    """
    for var in _MPI_SIZE_VARS:
        value = env.get(var, "")
        if value.isdigit():
            return int(value), var
    value = env.get("SLURM_STEP_NUM_TASKS", "")
    if value.isdigit() and "SLURM_PROCID" in env:
        return int(value), "SLURM_STEP_NUM_TASKS"
    return 1, None


def _mpi_world(launched: int, var: str | None):
    """MPI.COMM_WORLD, checked against what the launcher started: ranks that cannot see each
    other would each prepare the whole dataset into the same output."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if launched > 1 and comm.Get_size() != launched:
        raise PrepError(
            f"{var}={launched}: {launched} processes were launched together, but MPI sees a world of "
            f"{comm.Get_size()} (the launcher and this mpi4py/MPI do not talk to each other).  Under SLURM, "
            f"launch with `srun --mpi=pmix` or with mpirun inside the allocation (launch/prep.sbatch); "
            f"or run a single process (srun -n 1)")
    return comm


def _mp_context():
    """A fork server that has already imported the pipeline: workers start in milliseconds
    instead of re-importing numpy/pyarrow/h5py each (spawn), and without fork's hazards
    in a process that may hold threads or an MPI library."""
    try:
        ctx = mp.get_context("forkserver")
    except ValueError:  # pragma: no cover - platforms without fork
        return mp.get_context("spawn")
    ctx.set_forkserver_preload(["data_prep.pipeline"])
    return ctx


def start_worker_server(workers: int) -> None:
    """Start the fork server now (when a pool of workers will be used) so that its imports
    run while this process does its own: call it before importing the pipeline."""
    if max(1, int(workers)) > 1:
        ctx = _mp_context()
        if ctx.get_start_method() == "forkserver":
            from multiprocessing import forkserver

            forkserver.ensure_running()


def _worker_init() -> None:
    # Die with the main process: a SIGKILLed dqrm-prep must not leave workers of hundreds of
    # MB running.  parent_process() is the main process (under the fork server too); its
    # sentinel becomes readable when that process is gone.
    parent = mp.parent_process()

    def exit_with_parent() -> None:
        parent.join()
        os.kill(os.getpid(), signal.SIGKILL)

    if parent is not None:
        threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()
    # One worker process per core: keep pyarrow from starting a thread per core in each.
    try:
        import pyarrow as pa

        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
    except Exception:  # pragma: no cover - best effort
        pass


class Executor:
    """map(fn, items) -> results in item order, with a progress bar."""

    def __init__(self, workers: int = 1, progress: bool = True, use_mpi: bool | None = None) -> None:
        self.workers = max(1, int(workers))
        self.comm = None
        launched, var = launched_world_size()
        if use_mpi is None:
            use_mpi = launched > 1
        if use_mpi:
            self.comm = _mpi_world(launched, var)
        self.rank = self.comm.Get_rank() if self.comm else 0
        self.size = self.comm.Get_size() if self.comm else 1
        self.progress = progress and self.rank == 0
        self._pool: ProcessPoolExecutor | None = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.comm:
            self.comm.Barrier()

    def bcast(self, obj: Any) -> Any:
        return self.comm.bcast(obj, root=0) if self.comm else obj

    def root_call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on rank 0, re-raise its error (or return its result) on every rank."""
        res, err = None, None
        if self.is_root:
            try:
                res = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised on every rank
                err = e
        res, err = self.bcast((res, err))
        if err is not None:
            raise err
        return res

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=_mp_context(), initializer=_worker_init)
        return self._pool

    def map(self, fn: Callable, items: Sequence, desc: str, total: float | None = None,
            unit: str = "it", weight: Callable[[Any], float] | None = None) -> list:
        mine = [i for i in range(len(items)) if i % self.size == self.rank]
        results: dict[int, Any] = {}
        error: BaseException | None = None
        bar = tqdm(total=total if total is not None else len(items), desc=desc, unit=unit,
                   unit_scale=True, disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        try:
            if self.workers == 1 or len(mine) <= 1:
                for i in mine:
                    results[i] = fn(items[i])
                    bar.update(weight(results[i]) if weight else 1)
            else:
                pool = self._get_pool()
                pending = {pool.submit(fn, items[i]): i for i in mine}
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        i = pending.pop(f)
                        results[i] = f.result()
                        bar.update(weight(results[i]) if weight else 1)
        except BaseException as e:  # noqa: BLE001
            if not self.comm:
                raise
            error = e
        finally:
            bar.close()
        if self.comm:
            gathered = self.comm.allgather((results, error))
            for _, err in gathered:
                if err is not None:
                    raise err
            for part, _ in gathered:
                results.update(part)
        return [results[i] for i in range(len(items))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
