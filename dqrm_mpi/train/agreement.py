"""Every rank agrees that a step is finite before anything changes state.

After ``loss.backward()`` and before the gradient exchange, each rank checks its own loss,
gradients and dense inputs; one allgather of those three flags ([3] float per rank) lets every
rank see which rank (if any) went non-finite.  A NaN gradient on one rank would poison the
averaged gradient of all ranks, so the check comes before the exchange, where it still names
the culprit.  On any flag every rank raises the same ``NonFiniteStepError`` (the culprits'
details are gathered once, on that path only): no ``optimizer.step()``, no checkpoint, the
last checkpoint written stays the last finite one.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..comm.collectives import Collectives

FLAGS = ("loss", "gradients", "dense inputs")


class NonFiniteStepError(FloatingPointError):
    """A step's loss, gradients or inputs were NaN/inf on some rank (message names rank and cause)."""


def _nonfinite(t: torch.Tensor) -> torch.Tensor:
    values = t._values() if t.is_sparse else t
    return (~torch.isfinite(values)).any()


def local_flags(loss: torch.Tensor, model: nn.Module, dense: torch.Tensor) -> torch.Tensor:
    """float32 [3]: 1 where this rank's loss, any gradient, or its dense inputs hold NaN/inf."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bad_grad = torch.stack([_nonfinite(g) for g in grads]).any() if grads else torch.tensor(False)
    return torch.stack([_nonfinite(loss.detach()), bad_grad.to(loss.device), _nonfinite(dense).to(loss.device)]
                       ).float().cpu()


def agree_finite(backend: Collectives, loss: torch.Tensor, model: nn.Module, dense: torch.Tensor,
                 locate_row: Callable[[int], str], step: int, lr: float) -> None:
    """Raise NonFiniteStepError on every rank when any rank's step ``step`` is not finite.

    dense: this rank's batch inputs float [b, 13]; locate_row(i): where row i of this rank's
    batch comes from (shard file and row), asked only on the failure path."""
    flags = local_flags(loss, model, dense)
    if backend.size > 1:
        flags = backend.allgather_stacked(flags, name="finite.flags", kind="check")  # [size, 3]
    else:
        flags = flags.unsqueeze(0)
    if not bool(flags.any()):
        return
    here = None
    if bool(flags[backend.rank].any()):
        here = ", ".join(name for name, f in zip(FLAGS, flags[backend.rank].tolist()) if f)
        bad_rows = (~torch.isfinite(dense)).any(dim=1).nonzero().flatten().tolist()
        if bad_rows:
            here += f"; NaN/inf dense values in {len(bad_rows)} row(s) of its batch, first {locate_row(bad_rows[0])}"
    details = backend.allgather_object(here, name="finite.details") if backend.size > 1 else [here]
    culprits = "; ".join(f"rank {r}: {d}" for r, d in enumerate(details) if d)
    if bool(flags[:, 2].any()):
        cause = "the training data holds non-finite values: repair or re-prepare that shard (dqrm-prep verify)"
    else:
        cause = f"training diverged: lower --lr (now {lr:g})"
    raise NonFiniteStepError(f"step {step}: NaN/inf in {culprits}; stopped before the update, the last "
                             f"checkpoint written is the last finite state; {cause}")


def shard_row(reader, row: int) -> str:
    """'row R of train (shard part-00001.h5, row r)' for row ``row`` of a SplitReader's split."""
    s = max(0, int(reader.starts.searchsorted(row, side="right")) - 1)
    return f"row {row} of {reader.split} (shard {reader.paths[s]}, row {row - int(reader.starts[s])})"
