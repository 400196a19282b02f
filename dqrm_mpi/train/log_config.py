"""What a training run reports while it runs (validated on construction)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .progress import MODES
from .tensorboard import require_tensorboard

MAX_AUTO_LOG_EVERY = 1000


def auto_log_every(steps_per_epoch: int) -> int:
    """About 100 windows per epoch, at least 1 and at most 1000 steps each: a Kaggle epoch
    (45.8 M rows x 6/7 = 39.3 M, about 307,000 steps at batch 128) writes 307 step lines
    (about 0.5 MB on 1 rank, 2 MB on 8), a tiny run one per step."""
    return min(MAX_AUTO_LOG_EVERY, max(1, steps_per_epoch // 100))


@dataclass(frozen=True)
class LogConfig:
    """progress: auto | bar | log | none (``progress.py``); progress_seconds: seconds between
    progress lines in log mode; log_every: steps per metrics.jsonl window (None: ``auto_log_every``);
    tensorboard: directory for TensorBoard event files (None: none)."""

    progress: str = "auto"
    progress_seconds: float = 60.0
    log_every: int | None = None
    tensorboard: Path | None = None

    def __post_init__(self) -> None:
        if self.tensorboard is not None:
            object.__setattr__(self, "tensorboard", Path(self.tensorboard))
            require_tensorboard()
        checks = [
            (self.progress in MODES, f"progress must be one of {MODES}, got {self.progress!r}"),
            (self.progress_seconds >= 0, f"progress_seconds must be >= 0, got {self.progress_seconds}"),
            (self.log_every is None or self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def window_steps(self, steps_per_epoch: int) -> int:
        """Steps per metrics.jsonl window (``log_every`` or the automatic choice)."""
        return self.log_every or auto_log_every(steps_per_epoch)
