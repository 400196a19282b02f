"""Evaluating a model on a dataset split."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.reader import SplitReader, eval_batches


@torch.no_grad()
def predict(model: nn.Module, data: str | Path, split: str = "test", batch: int = 16384
            ) -> tuple[np.ndarray, np.ndarray]:
    """(click probabilities float64 [n], labels [n]) of every row of a split, in file order."""
    model.eval()
    reader = SplitReader(data, split)
    probs, labels = [], []
    try:
        for b in eval_batches(reader, batch, 0, 1):
            probs.append(torch.sigmoid(model(b.dense, b.sparse)).double().numpy())
            labels.append(b.label.numpy())
    finally:
        reader.close()
    return np.concatenate(probs), np.concatenate(labels)
