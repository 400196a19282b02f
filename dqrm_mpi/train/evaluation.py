"""Evaluating a model on a dataset split: ``predict`` in one process, ``evaluate`` sharded
over the ranks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..comm.collectives import Collectives
from ..data.reader import SplitReader, eval_batches
from .metrics import binary_metrics


@torch.no_grad()
def predict(model: nn.Module, data: str | Path, split: str = "test", batch: int = 16384
            ) -> tuple[np.ndarray, np.ndarray]:
    """(click probabilities float64 [n], labels [n]) of every row of a split, in file order."""
    model.eval()
    reader = SplitReader(data, split)
    probs, labels = [], []
    try:
        with eval_batches(reader, batch, 0, 1) as batches:
            for b in batches:
                probs.append(torch.sigmoid(model(b.dense, b.sparse)).double().numpy())
                labels.append(b.label.numpy())
    finally:
        reader.close()
    return np.concatenate(probs), np.concatenate(labels)


@torch.no_grad()
def evaluate(model: nn.Module, reader: SplitReader, backend: Collectives, batch: int,
             device: torch.device, show_bar: bool = False) -> dict[str, float] | None:
    """Metrics over every row of the split, computed once from all ranks' predictions.

    Returns the metrics on rank 0 and None elsewhere.  ``show_bar``: rank 0 shows a
    (vanishing) progress bar on stderr, for terminals (``--progress bar``).
    """
    was_training = model.training
    model.eval()
    probs, labels = [], []
    share = reader.num_rows // backend.size  # rank 0's rows (eval_batches), the rank that shows the bar
    with eval_batches(reader, batch, backend.rank, backend.size) as batches:
        for b in tqdm(batches, desc=f"eval {reader.split}", unit="batch", total=-(-share // batch), leave=False,
                      disable=not show_bar or backend.rank != 0):
            b = b.to(device)
            probs.append(torch.sigmoid(model(b.dense, b.sparse)).float().cpu())
            labels.append(b.label.cpu())
    model.train(was_training)
    prob = torch.cat(probs) if probs else torch.empty(0)
    label = torch.cat(labels) if labels else torch.empty(0)
    if backend.size > 1:
        prob = backend.allgather_array(prob, name=f"eval.{reader.split}.prob")
        label = backend.allgather_array(label, name=f"eval.{reader.split}.label")
    return binary_metrics(label.numpy(), prob.numpy()) if backend.rank == 0 else None
