"""``--keep-epoch-checkpoints``: the model at the end of every epoch, kept beside ``checkpoint.pt``
as ``checkpoint-epoch{N}.pt`` (N as in metrics.jsonl's ``epoch``: 0 is the first), so
post-training quantization can be applied to the model of any epoch."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .run_dir import CHECKPOINT


def epoch_checkpoint_name(epoch: int) -> str:
    return f"checkpoint-epoch{epoch}.pt"


def keep_epoch_checkpoint(run_dir: str | Path, epoch: int) -> Path:
    """Keep the run's ``checkpoint.pt``, just written at the end of ``epoch``, as
    ``checkpoint-epoch{epoch}.pt``: a hard link where the file system has them, else a copy;
    made under a temporary name and renamed, so the name never holds a partial file.  (A link
    stays the epoch's model because checkpoint.pt is always replaced by a new file, never
    rewritten in place: ``RunDir.save_checkpoint``.)"""
    run_dir = Path(run_dir)
    final = run_dir / epoch_checkpoint_name(epoch)
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(run_dir / CHECKPOINT, tmp)
        except OSError:
            shutil.copyfile(run_dir / CHECKPOINT, tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final
