"""``--keep-best SPLIT``: the model of the evaluation with the best AUC on SPLIT, kept beside
``checkpoint.pt`` as ``checkpoint-best.pt`` and replaced at each new best (written through a
temporary name and renamed, as ``checkpoint.pt`` is: ``RunDir.save_checkpoint``), with the
evaluation that selected it.

summary.json's ``selected_by_SPLIT`` is that evaluation: its step, epoch and metrics on every
split evaluated at that step.  With ``--keep-best val`` its ``test`` metrics are those of a
model chosen without looking at the test split, beside ``best_test`` (the best test value
seen, which picks the model on the test split, as the DQRM paper reports).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .run_dir import BEST_CHECKPOINT

KEEP_BEST = ("none", "val", "test")
METRIC = "auc"  # higher is better; the first evaluation reaching the best value is kept


class BestSelection:
    """The best evaluation so far by ``split``'s AUC (rank 0).  ``previous``: the selection
    a resumed run continues from (``previous_selection``), None for none."""

    def __init__(self, split: str, previous: dict[str, Any] | None = None) -> None:
        self.split = split
        self.selected = previous if previous and previous.get("split") == split else None

    @property
    def summary_key(self) -> str:
        return f"selected_by_{self.split}"

    def consider(self, step: int, epoch: int, results: dict[str, dict[str, float]]) -> bool:
        """Whether the evaluation at ``step`` (``results``: split -> metrics) is a new best."""
        result = results.get(self.split)
        if result is None or not math.isfinite(result[METRIC]):
            return False
        if self.selected is not None and result[METRIC] <= self.selected[self.split][METRIC]:
            return False
        self.selected = {"split": self.split, "metric": METRIC, "step": step, "epoch": epoch,
                         **{s: dict(m) for s, m in results.items()}}
        return True


def previous_selection(run_dir: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """The selection kept in ``run_dir``'s checkpoint-best.pt, for a resumed run: (selection
    or None, why it could not be read or None).  Memory-mapped: the weights are not read."""
    path = Path(run_dir) / BEST_CHECKPOINT
    if not path.exists():
        return None, None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return dict(state["selected"]), None
    except Exception as e:  # noqa: BLE001 - truncated, not a checkpoint, written without a selection
        return None, f"cannot read {path} ({type(e).__name__}: {e})"
