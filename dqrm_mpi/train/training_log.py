"""Everything a training run reports: metrics.jsonl's lines, the progress display,
TensorBoard and summary.json's training and communication fields.

Training is logged per window of ``log_every`` steps (windows also end with each epoch):
every rank adds up its own batches' losses, and at the window's end the one gather that
brings the communication figures to rank 0 (``CommOverheadLog.flush``) carries the loss
sums too, so the logged loss is the mean over all ranks' batches at no extra collective.
Rank 0 then writes, all with ``time`` (Unix seconds):

  {"event": "step", "step": last, "first_step", "steps", "epoch", "loss" (all ranks),
   "seconds" and "step_time" {part: seconds} (rank 0, per step, data wait included),
   "samples_per_second", "comm_bytes_sent", "comm_bytes_received", "comm_seconds",
   "codec_seconds", "exchange_seconds", "waited_seconds", "comm_breakdown" (rank 0, per step),
   "lr": {"emb": rate, "mlp": rate} (the optimizers' rates at the window's last step)}
  (exchange_seconds: the gradient exchange from its first collective started, inside backward
   with --overlap, else the end of backward, to its last result decoded; waited_seconds: the
   part of the step spent on it on the training thread, encoding in backward's hooks plus the
   end of backward to the last decode: see traffic.py)
  {"event": "comm", ...}                                 every rank's figures (overhead.py)
  {"event": "epoch", "epoch", "step", "steps", "complete", "loss" (all ranks), "seconds",
   "samples_per_second"}                                 when an epoch's training ends
  {"event": "eval", "split", "epoch", "step", "accuracy", "auc", "log_loss", "rows", "ctr"}

Figures of a step line are means per step over the window; with ``--log-every 1`` they
are each step's own.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

from ..comm.collectives import Collectives
from ..comm.overhead import CommOverheadLog, CommWindow
from .log_config import LogConfig
from .metrics import format_auc
from .progress import Progress
from .run_dir import RunDir
from .step_timer import TRAIN_PARTS, StepTimer
from .tensorboard import TensorBoardLog

# summary.json's "best": +1 where higher is better, -1 where lower is
BETTER = {"accuracy": 1, "auc": 1, "log_loss": -1}


class TrainingLog:
    """Windows, epochs, evaluations and the summary fields of one run (see the module doc).

    ``after_step``, ``end_window`` and ``end_epoch`` are collective (every rank calls them at
    the same steps); the rest writes on rank 0 (``run`` given) and does nothing elsewhere.
    """

    def __init__(self, backend: Collectives, run: RunDir | None, config: LogConfig, timer: StepTimer, *,
                 batch_size: int, steps_per_epoch: int, total_steps: int, start_step: int,
                 learning_rates: Callable[[int], dict[str, float]] | None = None) -> None:
        self.backend, self.run, self.timer, self.batch_size = backend, run, timer, batch_size
        self.learning_rates = learning_rates  # global step (from 0) -> {"emb": rate, "mlp": rate}
        self.steps_per_epoch = steps_per_epoch
        self.window_steps = config.window_steps(steps_per_epoch)
        self.comm = CommOverheadLog(backend)
        self.progress = Progress(config.progress, total_steps, start_step, batch_size, config.progress_seconds,
                                 enabled=run is not None)
        self.tensorboard = TensorBoardLog(config.tensorboard) if run and config.tensorboard else None
        self.started_at = time.time()
        self.steps = 0  # steps taken by this invocation
        self._loss = [0.0, 0]  # this rank's loss sum and steps in the open window
        # this rank, every step: summed
        self._comm = {"comm_seconds": 0.0, "codec_seconds": 0.0, "exchange_seconds": 0.0, "waited_seconds": 0.0}
        # rank 0 only
        self._epoch = {"loss": 0.0, "batches": 0, "steps": 0, "train_seconds": timer.train_seconds}
        self.epochs: list[dict[str, Any]] = []  # per-epoch training loss
        self.last_window: dict[str, Any] | None = None
        self.final: dict[str, dict[str, float]] = {}  # latest metrics per split
        self.best: dict[str, dict[str, dict[str, float]]] = {}  # split -> metric -> value, step, epoch
        self.best_test: dict[str, Any] | None = None  # the evaluation with the best test AUC

    @property
    def eval_bars(self) -> bool:
        return self.progress.eval_bars

    def record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line with its wall-clock ``time`` (rank 0)."""
        if self.run:
            self.run.log({"time": round(time.time(), 3), **record})

    def message(self, text: str) -> None:
        """A line for the user, on stdout at once (rank 0)."""
        self.progress.message(text)

    def after_step(self, step: int, epoch: int, loss: float) -> None:
        """Every rank after each step: count ``loss`` (this rank's batch mean) and the step's
        traffic; at window ends (collective) rank 0 writes the step and comm lines."""
        self.timer.lap("other")
        traffic = self.comm.record_step(step)
        self.steps += 1
        self._loss[0] += loss
        self._loss[1] += 1
        for k in self._comm:
            self._comm[k] += traffic[k]
        self.progress.step(step, epoch, loss, traffic["comm_seconds"], self.timer.train_seconds)
        if step % self.window_steps == 0:
            self.end_window(epoch)
        else:
            self.comm.maybe_gather()
        self.timer.lap("other")  # the logging itself

    def end_epoch(self, step: int, epoch: int) -> None:
        """Every rank when an epoch's training ends (complete or stopped): close the window;
        rank 0 writes the epoch line."""
        self.end_window(epoch)
        self.timer.lap("other")
        e, self._epoch = self._epoch, {"loss": 0.0, "batches": 0, "steps": 0, "train_seconds": self.timer.train_seconds}
        if not self.run or not e["steps"]:
            return
        seconds = self.timer.train_seconds - e["train_seconds"]
        record = {"epoch": epoch, "step": step, "steps": e["steps"], "complete": step % self.steps_per_epoch == 0,
                  "loss": e["loss"] / e["batches"], "seconds": seconds,
                  "samples_per_second": e["steps"] * self.batch_size / seconds if seconds else 0.0}
        self.epochs.append(record)
        self.record({"event": "epoch", **record})
        if self.tensorboard:
            self.tensorboard.epoch(step, record["loss"])
        self.message(f"[dqrm-train] epoch {epoch} trained to step {step}: loss {record['loss']:.4f} "
                     f"(all ranks), {record['samples_per_second']:,.0f} samples/s")

    def end_window(self, epoch: int) -> None:
        """Collective unless no step was taken since the last window (the same on every rank):
        gather the window's figures; rank 0 writes its step (and comm) lines.  The loop also
        ends a window at each checkpoint, so metrics.jsonl is complete up to a resumed step."""
        if not self._loss[1]:  # nothing since the last window (the same on every rank)
            return
        window = self.comm.flush(self.record if self.run else None, attach=tuple(self._loss))
        self._loss = [0.0, 0]
        parts = self.timer.take_window()
        if window is not None:
            self._write_window(window, epoch, parts)

    def _write_window(self, window: CommWindow, epoch: int, parts: dict[str, float]) -> None:
        loss_sum = sum(s for s, _ in window.attached)
        batches = sum(n for _, n in window.attached)
        loss, n, seconds = loss_sum / batches, window.steps, sum(parts.values())
        self._epoch["loss"] += loss_sum
        self._epoch["batches"] += batches
        self._epoch["steps"] += n
        own = window.ranks[0]
        rate = n * self.batch_size / seconds if seconds else 0.0
        # the rates of the window's last step (global step window.step - 1, from 0)
        lr = {"lr": self.learning_rates(window.step - 1)} if self.learning_rates else {}
        self.record({"event": "step", "step": window.step, "first_step": window.first_step, "steps": n,
                     "epoch": epoch, "loss": loss, "seconds": seconds / n, "samples_per_second": rate,
                     "step_time": {p: s / n for p, s in parts.items()},
                     "comm_bytes_sent": own["sent"], "comm_bytes_received": own["received"],
                     "comm_seconds": own["seconds"], "codec_seconds": own["codec_seconds"],
                     "exchange_seconds": own["exchange_seconds"], "waited_seconds": own["waited_seconds"],
                     "comm_breakdown": own["by_collective"], **lr})
        self.last_window = {"step": window.step, "steps": n, "loss": loss}
        if self.tensorboard:
            self.tensorboard.window(window.step, loss, rate, own["sent"], own["received"], own["seconds"],
                                    lr.get("lr", {}))

    def evaluated(self, step: int, epoch: int, split: str, result: dict[str, float] | None) -> None:
        """Rank 0 (``result`` None elsewhere): the eval line, best values, TensorBoard, a message."""
        if not self.run or result is None:
            return
        self.record({"event": "eval", "split": split, "epoch": epoch, "step": step, **result})
        self.final[split] = result
        best = self.best.setdefault(split, {})
        for metric, sign in BETTER.items():
            value = result[metric]
            if math.isfinite(value) and (metric not in best or sign * (value - best[metric]["value"]) > 0):
                best[metric] = {"value": value, "step": step, "epoch": epoch}
        if split == "test" and best.get("auc", {}).get("step") == step:
            self.best_test = {"epoch": epoch, "step": step, **result}
        if self.tensorboard:
            self.tensorboard.evaluation(step, split, result)
        self.message(f"[dqrm-train] step {step} epoch {epoch} {split}: acc {result['accuracy']:.4f} "
                     f"auc {format_auc(result)} logloss {result['log_loss']:.4f}")

    def summary_fields(self) -> dict[str, Any]:
        """summary.json's training and communication fields (rank 0's view; comm: every rank's).
        Call after the last ``end_epoch``."""
        steps, train = self.steps, self.timer.train_seconds
        per_step = {p: self.timer.total[p] / steps if steps else 0.0 for p in TRAIN_PARTS}
        per_step["comm_wait"] = self._comm["comm_seconds"] / steps if steps else 0.0  # parts of exchange
        per_step["codec"] = self._comm["codec_seconds"] / steps if steps else 0.0
        # the exchange's span (first start, in backward with --overlap, to last decode) and the part
        # the step spent on it (encoding in backward's hooks + synchronize()): see comm/traffic.py
        per_step["exchange_span"] = self._comm["exchange_seconds"] / steps if steps else 0.0
        per_step["exchange_waited"] = self._comm["waited_seconds"] / steps if steps else 0.0
        per_step["total"] = train / steps if steps else 0.0
        now = time.time()
        return {
            "steps_per_epoch": self.steps_per_epoch,
            "log_every": self.window_steps,
            "train_seconds": train,
            "samples_per_second": steps * self.batch_size / train if train else 0.0,
            "step_time": per_step,
            "eval_seconds": self.timer.total["eval"],
            "checkpoint_seconds": self.timer.total["checkpoint"],
            "started_at": self.started_at,
            "finished_at": now,
            "wall_seconds": now - self.started_at,
            "train_loss": {"per_epoch": self.epochs, "last_window": self.last_window},
            "final": self.final,
            "best": self.best,
            "best_test": self.best_test,
            **self.comm.summary_fields(),  # comm_*_per_step (this rank), comm_per_rank (rank 0)
        }

    def close(self) -> None:
        self.progress.close()
        if self.tensorboard:
            self.tensorboard.close()
