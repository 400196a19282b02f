"""Checkpoints (what they hold, loading one as a model) and the run directory's life
cycle: fresh, overwritten or resumed."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model import DLRM, ModelConfig
from ..quant import QATState, QuantConfig, prepare_qat
from .config import TrainConfig
from .optimizers import OptimConfig
from .run_dir import BEST_CHECKPOINT, CHECKPOINT, json_safe

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", CHECKPOINT, BEST_CHECKPOINT)
# Fields a resumed run must share with the checkpoint's run (the rest, e.g. lr, epochs,
# max_steps, evaluation and compression settings, may change on resume).
RESUME_KEYS = ("data", "preset", "embedding_dim", "bottom_mlp", "top_mlp", "batch_size", "seed", "quant")
# and the optimizers (their state belongs to them; rates and schedule may change)
OPTIMIZER_KEYS = ("emb_optimizer", "mlp_optimizer")


def checkpoint_state(model: nn.Module, model_config: dict[str, Any], config: TrainConfig, step: int,
                     epoch: int, optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``checkpoint.pt`` holds: weights and QAT buffers, configurations, global step and
    the optimizers' state (``TrainingOptimizer.state_dict``: empty for plain SGD)."""
    return {"model": model.state_dict(), "model_config": model_config, "train_config": json_safe(config.to_dict()),
            "step": step, "epoch": epoch, "optimizer": optimizer or {}}


def load_checkpoint(path: str | Path) -> tuple[DLRM, QuantConfig, QATState | None]:
    """A ``dqrm-train`` checkpoint as (model in eval mode, its QuantConfig, its QATState or None)."""
    return model_from_checkpoint(read_checkpoint(path))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict ``checkpoint_state`` saved; ValueError when ``path`` is not a checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{path}: not a dqrm-train checkpoint or packed model ({e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path}: not a dqrm-train checkpoint (no model / model_config)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[DLRM, QuantConfig, QATState | None]:
    """``load_checkpoint`` of a dict ``read_checkpoint`` returned."""
    config = ModelConfig(**ckpt["model_config"])
    quant = QuantConfig.from_dict((ckpt.get("train_config") or {}).get("quant"))
    model = DLRM(config)
    state = prepare_qat(model, quant) if quant.enabled else None
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, quant, state


def prepare_out_dir(config: TrainConfig) -> dict[str, Any] | None:
    """Check (on rank 0) what ``--out`` holds against --resume / --overwrite.

    Returns the checkpoint to resume from, or None for a fresh run.  Raises ValueError
    when a previous run would be mixed with this one or cannot be resumed.  ``--resume
    auto`` resumes when ``checkpoint.pt`` exists and otherwise starts afresh, replacing
    what a run stopped before its first checkpoint left (config.json, metrics.jsonl).
    """
    out = Path(config.out)
    previous = [name for name in RUN_FILES if (out / name).exists()]
    path = out / CHECKPOINT
    if config.overwrite or (config.resume == "auto" and not path.exists()):
        for name in previous:
            (out / name).unlink()
        return None
    if config.resume != "no":
        if not path.exists():
            raise ValueError(f"--resume: {path} does not exist (nothing to resume; --resume auto starts afresh "
                             "then)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            saved = state["train_config"]
        except Exception as e:  # noqa: BLE001 - truncated, not a checkpoint, unpicklable
            raise ValueError(f"--resume: cannot read {path} ({type(e).__name__}: {e})") from None
        now = json_safe(config.to_dict())
        changed = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
        before = OptimConfig.from_dict(saved.get("optim"))  # a checkpoint from before the option: SGD
        changed += [f"optim.{k}" for k in OPTIMIZER_KEYS if getattr(before, k) != getattr(config.optim, k)]
        if changed:
            details = ", ".join(f"{k}: {_setting(saved, k)!r} -> {_setting(now, k)!r}" for k in changed)
            raise ValueError(f"--resume: {path} was trained with other settings ({details})")
        return state
    if previous:
        raise ValueError(f"--out {out} already holds a run ({', '.join(previous)}): pass --resume to continue "
                         f"it from its checkpoint or --overwrite to start afresh")
    return None


def _setting(train_config: dict[str, Any], key: str) -> Any:
    """A training setting by its RESUME_KEYS / ``optim.``-prefixed name (the optimizers: sgd
    for a checkpoint from before they could be chosen)."""
    if key.startswith("optim."):
        return OptimConfig.from_dict(train_config.get("optim")).to_dict()[key.split(".", 1)[1]]
    return train_config.get(key)
