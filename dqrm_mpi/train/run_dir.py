"""The run directory: config.json, metrics.jsonl, summary.json, checkpoint.pt."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..data.schema import write_atomic_text

CHECKPOINT = "checkpoint.pt"


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
    """Written by rank 0 only.  ``metrics.jsonl`` is appended line by line and flushed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"--out {self.path}: cannot create the run directory ({e.strerror})") from None
        self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        write_atomic_text(self.path / name, json.dumps(json_safe(obj), indent=2, sort_keys=True) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(json_safe(record), sort_keys=True) + "\n")

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        final = self.path / CHECKPOINT
        tmp = final.with_name(f".{CHECKPOINT}.tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, final)
        except BaseException:  # keep the previous checkpoint, leave no partial file
            tmp.unlink(missing_ok=True)
            raise
        return final

    def close(self) -> None:
        self._metrics.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(Path(path) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
