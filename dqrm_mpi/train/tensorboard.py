"""``--tensorboard DIR``: rank 0's training curves as TensorBoard scalars (x axis: global step).

  train/loss                 per logging window, mean over all ranks and the window's steps
  train/epoch_loss           per epoch, the same mean over the epoch
  train/samples_per_second   per window, wall clock with data wait
  comm/bytes_sent_per_step   per window, rank 0 (likewise bytes_received_per_step, ms_per_step)
  lr/emb, lr/mlp             per window, the optimizers' rates at its last step
  {split}/auc, {split}/accuracy, {split}/log_loss   per evaluation
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def require_tensorboard() -> None:
    """ValueError unless the tensorboard package (an optional dependency) is installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'dqrm_mpi[tensorboard]' "
                         "(or pip install tensorboard)")


class TensorBoardLog:
    """A SummaryWriter on ``log_dir`` with the scalars listed in the module doc."""

    def __init__(self, log_dir: str | Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def window(self, step: int, loss: float, samples_per_second: float, bytes_sent: float, bytes_received: float,
               comm_seconds: float, learning_rates: dict[str, float] | None = None) -> None:
        w = self.writer
        w.add_scalar("train/loss", loss, step)
        w.add_scalar("train/samples_per_second", samples_per_second, step)
        w.add_scalar("comm/bytes_sent_per_step", bytes_sent, step)
        w.add_scalar("comm/bytes_received_per_step", bytes_received, step)
        w.add_scalar("comm/ms_per_step", comm_seconds * 1e3, step)
        for part, rate in (learning_rates or {}).items():
            w.add_scalar(f"lr/{part}", rate, step)

    def epoch(self, step: int, loss: float) -> None:
        self.writer.add_scalar("train/epoch_loss", loss, step)

    def evaluation(self, step: int, split: str, metrics: dict[str, float]) -> None:
        for name in ("auc", "accuracy", "log_loss"):
            self.writer.add_scalar(f"{split}/{name}", metrics[name], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
