"""Why vanilla PTQ INT4 does, or does not, lose accuracy on a data set.

Issue 8's diagnosis, computed from an FP32 run trained with ``--keep-epoch-checkpoints``:

- per epoch: the FP32 model's train and test AUC (does it overfit after epoch 1-2?), and the
  test AUC of the same model after vanilla PTQ INT4 (what ``dqrm-export --bits 4`` makes);
- per embedding table of the final model: max|W| / median|W| (one INT4 scale per table
  spends its 15 levels on the largest weight: a heavy tail leaves the typical row with one
  or two levels), and the share of the test split's lookups whose row INT4 rounds to all
  zeros (those features vanish from the quantized model).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.reader import SplitReader
from ..qcore.uniform import quantize, tensor_scale
from ..quant.config import QuantConfig
from ..quant.ptq import post_training_quantize
from ..train.checkpoint import load_checkpoint
from ..train.epoch_checkpoint import epoch_checkpoint_name
from ..train.evaluation import predict
from ..train.metrics import binary_metrics
from ..train.run_dir import CHECKPOINT

@dataclass(frozen=True)
class TableStats:
    """One embedding table [rows, d] of a trained model, against the lookups of a split."""

    rows: int
    max_abs: float
    median_abs: float
    zero_lookup_share: float    # lookups whose row quantizes to all zeros / all lookups
    zero_row_share: float       # distinct looked-up rows that quantize to all zeros / distinct looked-up rows

    @property
    def max_over_median(self) -> float:
        return self.max_abs / self.median_abs if self.median_abs > 0 else float("inf")


@torch.no_grad()
def table_stats(weight: torch.Tensor, ids: np.ndarray, bits: int) -> TableStats:
    """weight float32 [rows, d]; ids int [n]: the split's lookups of this table; one scale per
    table (max|W| / qmax), as PTQ and QAT use for embeddings."""
    absw = weight.abs()
    unique, counts = np.unique(ids, return_counts=True)
    zero = torch.zeros(len(unique), dtype=torch.bool)
    if len(unique):
        rows = weight[torch.from_numpy(unique.astype(np.int64))]
        zero = (quantize(rows, tensor_scale(weight, bits), bits) == 0).all(dim=1)
    z = zero.numpy()
    return TableStats(rows=int(weight.shape[0]), max_abs=float(absw.max()), median_abs=float(absw.median()),
                      zero_lookup_share=float(counts[z].sum() / max(counts.sum(), 1)),
                      zero_row_share=float(z.mean()) if len(z) else 0.0)


def split_ids(data: str | Path, split: str) -> np.ndarray:
    """Every lookup of a split: int64 [rows, tables]."""
    reader = SplitReader(data, split)
    try:
        return reader.read(0, reader.num_rows).sparse.numpy()
    finally:
        reader.close()


def ptq(bits: int) -> QuantConfig:
    """The quantization ``dqrm-export --bits B`` applies to an FP32 model."""
    return QuantConfig(emb_bits=bits, mlp_bits=bits, mlp_scale="channel")


def epoch_rows(run_dir: Path, data: str | Path, bits: int, splits: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per kept epoch checkpoint: the FP32 model's AUC and log loss on each split, and test AUC after PTQ."""
    rows = []
    epoch = 0
    while (path := run_dir / epoch_checkpoint_name(epoch)).exists():
        row: dict[str, Any] = {"epoch": epoch}
        model = _fp32_model(path)
        for split in splits:
            m = binary_metrics(*reversed(predict(model, data, split)))
            row[f"{split}_auc"], row[f"{split}_log_loss"] = m["auc"], m["log_loss"]
        post_training_quantize(model, ptq(bits))
        row[f"ptq{bits}_test_auc"] = binary_metrics(*reversed(predict(model, data, "test")))["auc"]
        rows.append(row)
        epoch += 1
    return rows


def _fp32_model(path: Path):
    """The FP32 DLRM of a checkpoint (ValueError for a quantization-aware one)."""
    model, quant, _ = load_checkpoint(path)
    if quant.enabled:
        raise ValueError(f"{path}: a quantization-aware checkpoint; the diagnosis needs an FP32 run")
    return model


def diagnose(run_dir: str | Path, data: str | Path, bits: int = 4,
             splits: tuple[str, ...] = ("train", "test")) -> dict[str, Any]:
    """The diagnosis of an FP32 run as JSON-ready dict: ``epochs`` (``epoch_rows``), ``tables``
    (``TableStats`` of the final model per table, against the test split's lookups) and the
    lookup-weighted share of all test lookups that INT``bits`` zeroes."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    weights = _fp32_model(path).embeddings.table_weights()
    ids = split_ids(data, "test")
    if len(weights) != ids.shape[1]:
        raise ValueError(f"{path}: {len(weights)} embedding tables, but {data} has {ids.shape[1]} sparse features")
    tables = [table_stats(w, ids[:, t], bits) for t, w in enumerate(weights)]
    epochs = epoch_rows(run_dir, data, bits, splits)
    return {
        "run": str(run_dir), "data": str(data), "bits": bits, "scale": "one per table",
        "epochs": epochs,
        "epochs_note": "" if epochs else "no checkpoint-epoch*.pt: train with --keep-epoch-checkpoints",
        "tables": [{**t.__dict__, "max_over_median": t.max_over_median} for t in tables],
        # every table has one lookup per row, so the mean of the tables' shares is the share of all lookups
        "zero_lookup_share": float(np.mean([t.zero_lookup_share for t in tables])),
    }
