"""Checkpoints (what they hold, loading one as a model) and the run directory's life
cycle: fresh, overwritten or resumed."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..model import DLRM, ModelConfig
from ..quant import QATState, QuantConfig, prepare_qat
from .config import TrainConfig
from .checkpoint_file import CheckpointError, read_checkpoint
from .optimizers import OptimConfig
from .run_dir import BEST_CHECKPOINT, CHECKPOINT, DAMAGED_CHECKPOINT, METRICS, PREV_CHECKPOINT, json_safe

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", CHECKPOINT, BEST_CHECKPOINT, PREV_CHECKPOINT,
             DAMAGED_CHECKPOINT)
# Fields a resumed run must share with the checkpoint's run (the rest, e.g. lr, epochs,
# max_steps, evaluation and compression settings, may change on resume).
RESUME_KEYS = ("data", "preset", "embedding_dim", "bottom_mlp", "top_mlp", "batch_size", "seed", "quant")
NOT_SETTINGS = ("resume", "overwrite")  # how this run treats --out, not how it trains
# and the optimizers (their state belongs to them; rates and schedule may change)
OPTIMIZER_KEYS = ("emb_optimizer", "mlp_optimizer")


def checkpoint_state(model: nn.Module, model_config: dict[str, Any], config: TrainConfig, step: int,
                     epoch: int, optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``checkpoint.pt`` holds: weights and QAT buffers, configurations, global step and
    the optimizers' state (``TrainingOptimizer.state_dict``: empty for plain SGD)."""
    return {"model": model.state_dict(), "model_config": model_config, "train_config": json_safe(config.to_dict()),
            "step": step, "epoch": epoch, "optimizer": optimizer or {}}


def load_checkpoint(path: str | Path) -> tuple[DLRM, QuantConfig, QATState | None]:
    """A ``dqrm-train`` checkpoint as (model in eval mode, its QuantConfig, its QATState or None),
    verified (``checkpoint_file.read_checkpoint``: CheckpointError, a ValueError, naming the
    file and what is wrong)."""
    return model_from_checkpoint(read_checkpoint(path))


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[DLRM, QuantConfig, QATState | None]:
    """``load_checkpoint`` of a dict ``read_checkpoint`` (``checkpoint_file``, re-exported here) returned."""
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
    auto`` resumes when ``checkpoint.pt`` (or ``checkpoint-prev.pt``) exists and otherwise
    starts afresh, replacing what a run stopped before its first checkpoint left
    (config.json, metrics.jsonl); a damaged or missing ``checkpoint.pt`` makes it resume
    from ``checkpoint-prev.pt`` (``resume_state``).
    """
    out = Path(config.out)
    for tmp in out.glob(f".{CHECKPOINT}.*.tmp"):  # a write cut off by a kill (the lock is ours: no writer now)
        tmp.unlink(missing_ok=True)
    previous = [name for name in RUN_FILES if (out / name).exists()]
    path = out / CHECKPOINT
    checkpointed = path.exists() or (out / PREV_CHECKPOINT).exists()
    if config.overwrite or (config.resume == "auto" and not checkpointed):
        for name in previous:
            (out / name).unlink()
        return None
    if config.resume != "no":
        if not checkpointed:
            raise ValueError(f"--resume: {path} does not exist (nothing to resume; --resume auto starts afresh "
                             "then)")
        state = resume_state(out, fall_back=config.resume == "auto")
        saved = state["train_config"]
        now = json_safe(config.to_dict())
        changed = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
        before = OptimConfig.from_dict(saved.get("optim"))  # a checkpoint from before the option: SGD
        changed += [f"optim.{k}" for k in OPTIMIZER_KEYS if getattr(before, k) != getattr(config.optim, k)]
        if changed:
            details = ", ".join(f"{k}: {_setting(saved, k)!r} -> {_setting(now, k)!r}" for k in changed)
            raise ValueError(f"--resume: {path} was trained with other settings ({details})")
        allowed = [k for k in sorted(set(saved) | set(now)) if k not in RESUME_KEYS and k not in NOT_SETTINGS
                   and saved.get(k) != now.get(k)]
        if allowed:
            print("[dqrm-train] --resume: settings changed since the checkpoint (allowed; config.json holds the "
                  "new ones): " + ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in allowed),
                  file=sys.stderr, flush=True)
        return state
    if previous:
        raise ValueError(f"--out {out} already holds a run ({', '.join(previous)}): pass --resume to continue "
                         f"it from its checkpoint or --overwrite to start afresh")
    return None


def resume_state(out: Path, fall_back: bool) -> dict[str, Any]:
    """The verified checkpoint to resume ``out``'s run from: ``checkpoint.pt``; when that is
    damaged or missing and ``fall_back`` (--resume auto), ``checkpoint-prev.pt``, saying
    which step is lost, and moving the unusable file to ``checkpoint-damaged.pt`` (so it is
    not kept as the previous checkpoint at the next save).  ValueError otherwise."""
    path, prev = out / CHECKPOINT, out / PREV_CHECKPOINT
    try:
        return read_checkpoint(path)
    except (CheckpointError, OSError) as e:
        problem = str(e) if isinstance(e, CheckpointError) else f"{path}: cannot be read ({e.strerror or e})"
        if isinstance(e, FileNotFoundError):
            problem = f"{path} is missing (the run was stopped while replacing it)"
    if not fall_back or not prev.exists():
        hint = f"; --resume auto resumes from the previous checkpoint, {prev}" if prev.exists() else ""
        raise ValueError(f"--resume: {problem}{hint}")
    try:
        state = read_checkpoint(prev)
    except (CheckpointError, OSError) as e:
        raise ValueError(f"--resume auto: {problem}; the previous checkpoint cannot be used either: {e}") from None
    lost = last_checkpoint_step(out / METRICS)
    if lost is not None and lost > state["step"]:
        what = f"the checkpoint of step {lost} is lost: steps {state['step'] + 1}..{lost} are trained again"
    else:
        what = "no later step is lost"
    if path.exists():
        os.replace(path, out / DAMAGED_CHECKPOINT)
        what += f"; the unusable file is kept as {out / DAMAGED_CHECKPOINT}"
    print(f"[dqrm-train] --resume auto: {problem}; resuming from {prev} at step {state['step']} instead ({what})",
          file=sys.stderr, flush=True)
    return state


def last_checkpoint_step(metrics: Path) -> int | None:
    """The step of the last ``checkpoint`` line in ``metrics.jsonl`` (None without one)."""
    step = None
    try:
        with open(metrics) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut off by a crash
                if isinstance(record, dict) and record.get("event") == "checkpoint":
                    step = record.get("step")
    except OSError:
        return None
    return step


def _setting(train_config: dict[str, Any], key: str) -> Any:
    """A training setting by its RESUME_KEYS / ``optim.``-prefixed name (the optimizers: sgd
    for a checkpoint from before they could be chosen)."""
    if key.startswith("optim."):
        return OptimConfig.from_dict(train_config.get("optim")).to_dict()[key.split(".", 1)[1]]
    return train_config.get(key)
