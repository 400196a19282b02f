"""The run directory: config.json, metrics.jsonl, summary.json, checkpoint.pt (and
checkpoint-prev.pt, the one before).

Every file is written whole or not at all (JSON and checkpoint through a temporary name,
metrics one whole line at a time), readable like any file the user creates, and a full
disk is reported with the path and the space needed (``files.DiskFullError``)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..files import append_line, write_atomic_bytes
from .checkpoint_file import write_checkpoint

CHECKPOINT = "checkpoint.pt"
PREV_CHECKPOINT = "checkpoint-prev.pt"  # the checkpoint before checkpoint.pt
# where --resume auto puts a checkpoint.pt it could not use (out of the rotation, for a look)
DAMAGED_CHECKPOINT = "checkpoint-damaged.pt"
BEST_CHECKPOINT = "checkpoint-best.pt"  # --keep-best (best_checkpoint.py)
METRICS = "metrics.jsonl"


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null, paths and tuples become strings and lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return str(obj)
    return obj


class RunDir:
    """Written by rank 0 only.  ``metrics.jsonl`` is appended line by line.

    ``resume_step``: the step of the checkpoint a resumed run starts from; metrics lines of
    later steps (written after that checkpoint by the interrupted run) are dropped, so the
    resumed run's lines follow on without repeats."""

    def __init__(self, path: str | Path, resume_step: int = 0) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"--out {self.path}: cannot create the run directory ({e.strerror})") from None
        metrics = self.path / METRICS
        if resume_step and metrics.exists():
            truncate_metrics(metrics, resume_step)
        self._metrics_path = metrics
        self._metrics = os.open(metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        write_atomic_bytes(self.path / name, (json.dumps(json_safe(obj), indent=2, sort_keys=True) + "\n").encode())

    def log(self, record: dict[str, Any]) -> None:
        append_line(self._metrics, self._metrics_path, (json.dumps(json_safe(record), sort_keys=True) + "\n").encode())

    def save_checkpoint(self, state: dict[str, Any], name: str = CHECKPOINT) -> Path:
        """Write ``name`` (``checkpoint.pt``, or ``checkpoint-best.pt``) with digests, verified by
        reading it back; the ``checkpoint.pt`` it replaces is kept as ``checkpoint-prev.pt``
        (renamed, once the new file is complete).  Non-finite weights are refused
        (FloatingPointError naming the tensor: the previous checkpoint stays)."""
        final = self.path / name
        for tensor, value in state["model"].items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise FloatingPointError(f"step {state['step']}: {tensor} holds NaN/inf values; the checkpoint "
                                         f"{final} was not overwritten (lower --lr)")
        return write_checkpoint(final, state, previous=self.path / PREV_CHECKPOINT if name == CHECKPOINT else None)

    def close(self) -> None:
        if self._metrics is not None:
            os.close(self._metrics)
            self._metrics = None


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of ``path`` up to ``step`` (records without a step stay; an unreadable
    last line, cut off by a crash, goes)."""
    lines = path.read_bytes().splitlines(keepends=True)
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON; cannot resume its metrics") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= step:
            kept.append(line)
    if kept and not kept[-1].endswith(b"\n"):
        kept[-1] += b"\n"
    if kept != lines:
        write_atomic_bytes(path, b"".join(kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(Path(path) / METRICS) as f:
        return [json.loads(line) for line in f if line.strip()]
