"""Every rank agrees that a step is finite before any parameter changes.

After ``loss.backward()`` and before the exchanged gradients are written, each rank checks its
own loss, gradients and dense inputs; one allgather of those three flags ([3] float per rank,
12 bytes, not counted in the step's communication figures) lets every rank see which rank (if
any) went non-finite.  A NaN gradient on one rank would poison the averaged gradient of all
ranks, so the check reads the local gradients, where it still names the culprit: with
``--overlap`` the exchange's collectives are already in flight, but ``p.grad`` stays local
until ``GradientSynchronizer.synchronize()``.  On any flag every rank raises the same
``NonFiniteStepError`` (the culprits' details are gathered once, on that path only): no
``optimizer.step()``, no checkpoint, the last checkpoint written stays the last finite one
(error-feedback residuals, which the overlapped encode may already have updated, are not
checkpointed: a resumed run starts them from zero).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .. import kernels
from ..comm.collectives import Collectives

FLAGS = ("loss", "gradients", "dense inputs")


class NonFiniteStepError(FloatingPointError):
    """A step's loss, gradients or inputs were NaN/inf on some rank (message names rank and cause)."""


def _nonfinite(t: torch.Tensor) -> torch.Tensor:
    """True when ``t`` holds NaN/inf: its min or max is not finite (aminmax propagates NaN)."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    return ~torch.isfinite(torch.stack(torch.aminmax(t))).all()


def _values(t: torch.Tensor) -> torch.Tensor:
    return t._values() if t.is_sparse else t


def local_flags(loss: torch.Tensor, params: Iterable[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
    """float32 [3]: 1 where this rank's loss, the gradient of any of ``params`` (the model's
    parameters: a list kept from step to step spares walking the modules), or its dense inputs
    hold NaN/inf.

    With the CPU kernels (``dqrm_mpi.kernels``): one exact pass over every tensor
    (``emb_nonfinite`` reads each value's exponent bits: nothing to overflow).  Otherwise every
    step takes the fast path: one sum per tensor and the sum of those sums, finite
    exactly when no value is NaN/inf (NaN and inf propagate through sums) unless finite
    values overflow float32, which only gradients past about 1e33 can.  A non-finite total
    (NaN/inf, or that overflow) is then checked exactly, tensor by tensor (``_nonfinite``),
    so an overflow never raises a false alarm.  The sums are about 3x cheaper than the exact
    check of every tensor (a sum is one vectorised read; aminmax runs several times slower)."""
    loss = loss.detach()
    grads = [_values(p.grad) for p in params if p.grad is not None]
    if kernels.enabled() and all(t.is_cpu for t in (loss, dense, *grads)):
        # one exact pass over every tensor (exponent bits), no sums that could overflow
        bad = kernels.ops.emb_nonfinite([loss, dense, *grads]).tolist()
        return torch.tensor([float(bad[0]), float(any(bad[2:])), float(bad[1])])
    total = torch.stack([t.sum() for t in (loss, dense, *grads)]).sum()
    if bool(torch.isfinite(total)):
        return torch.zeros(3)
    bad_grad = torch.stack([_nonfinite(g) for g in grads]).any() if grads else torch.tensor(False)
    return torch.stack([_nonfinite(loss), bad_grad.to(loss.device), _nonfinite(dense).to(loss.device)]
                       ).float().cpu()


def agree_finite(backend: Collectives, loss: torch.Tensor, params: Iterable[torch.Tensor], dense: torch.Tensor,
                 locate_rows: Callable[[int, int], str], step: int, lr: float) -> None:
    """Raise NonFiniteStepError on every rank when any rank's step ``step`` is not finite.

    dense: this rank's batch inputs float [b, 13]; locate_rows(i, j): where rows i..j of this
    rank's batch come from (shard file and rows), asked only on the failure path."""
    flags = local_flags(loss, params, dense)
    if backend.size > 1:
        # bookkeeping like evaluation: not counted in the step's communication figures
        flags = backend.allgather_array(flags, name="finite.flags").view(backend.size, len(FLAGS))
    else:
        flags = flags.unsqueeze(0)
    if not bool(flags.any()):
        return
    here = None
    if bool(flags[backend.rank].any()):
        here = ", ".join(name for name, f in zip(FLAGS, flags[backend.rank].tolist()) if f)
        bad_rows = (~torch.isfinite(dense)).any(dim=1).nonzero().flatten().tolist()
        if bad_rows:
            here += f"; NaN/inf dense values in {len(bad_rows)} row(s) of its batch, first {locate_rows(bad_rows[0], bad_rows[0])}"
    details = backend.allgather_object(here, name="finite.details") if backend.size > 1 else [here]
    culprits = "; ".join(f"rank {r}: {d}" for r, d in enumerate(details) if d)
    if bool(flags[:, 2].any()):
        cause = "the training data holds non-finite values: repair or re-prepare that shard (dqrm-prep verify)"
    else:
        cause = f"training diverged: lower --lr (now {lr:g})"
    raise NonFiniteStepError(f"step {step}: NaN/inf in {culprits}; stopped before the update, the last "
                             f"checkpoint written is the last finite state; {cause}")


def shard_rows(reader, first: int, last: int) -> str:
    """Where rows ``first..last`` (inclusive) of a SplitReader's split are stored, e.g.
    'train rows 6200-6399 (shard .../part-00001.h5 rows 1200-1399)'."""
    parts = []
    for s, path in enumerate(reader.paths):
        lo, hi = max(first, int(reader.starts[s])), min(last, int(reader.starts[s + 1]) - 1)
        if lo <= hi:
            local = f"{lo - int(reader.starts[s])}" + (f"-{hi - int(reader.starts[s])}" if hi > lo else "")
            parts.append(f"shard {path} row{'s' if hi > lo else ''} {local}")
    rows = f"{first}-{last}" if last > first else f"{first}"
    return f"{reader.split} row{'s' if last > first else ''} {rows} ({', '.join(parts)})"
