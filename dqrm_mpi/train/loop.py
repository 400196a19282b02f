"""The data-parallel training loop behind ``dqrm-train``.

``train`` reads as its steps: set up the model, start afresh or resume (rank 0 checks
``--out``), then per epoch train steps (forward, backward, gradient exchange, SGD step,
activation-scale averaging, logging), evaluate, checkpoint, and write the summary.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..comm.backend import HorovodBackend, default_threads
from ..comm.collectives import Collectives
from ..comm.overhead import CommOverheadLog
from ..comm.sync import GradientSynchronizer
from ..data.reader import SplitReader, TrainBatches
from ..data.schema import DatasetMeta, read_meta
from ..model import DLRM, ModelConfig, model_config_from_preset
from ..quant.qat import QATState, prepare_qat
from .checkpoint import CHECKPOINT, checkpoint_state, prepare_out_dir
from .config import TrainConfig
from .preemption import CheckpointSchedule, Preempted, StopSignals
from .evaluation import bar_interval, evaluate
from .report import format_summary
from .run_dir import RunDir


def select_device(name: str, local_rank: int) -> torch.device:
    """auto: the GPU of this local rank when torch sees CUDA, else the CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device on this node")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def train(config: TrainConfig, backend: Collectives | None = None) -> dict[str, Any]:
    """Run training as configured; returns the summary (on every rank; rank 0 writes files).

    Raises ``Preempted`` on every rank after SIGUSR1 or SIGTERM stopped the run at a
    checkpoint (see ``preemption``)."""
    with StopSignals() as signals:
        backend = backend or HorovodBackend()
        torch.set_num_threads(config.threads or default_threads(backend))
        device = select_device(config.device, backend.local_rank)
        meta = read_meta(config.data)
        model_config, model, qat = build_model(config, meta, device)
        start_step = start_or_resume(config, model, backend)
        run = _Training(config, backend, device, meta, model_config, model, qat, start_step, signals)
        try:
            last_epoch = run.train_epochs()
            return run.finish(last_epoch)
        finally:
            run.close()


def build_model(config: TrainConfig, meta: DatasetMeta, device: torch.device
                ) -> tuple[ModelConfig, DLRM, QATState | None]:
    """The seeded DLRM for the dataset's tables, made quantization-aware when configured.

    QAT scales, counters and modes are buffers, so the broadcast that follows brings rank
    0's to every rank."""
    model_config = model_config_from_preset(config.preset, meta.cardinalities, config.embedding_dim,
                                            config.bottom_mlp, config.top_mlp)
    torch.manual_seed(config.seed)
    model = DLRM(model_config).to(device)
    qat = prepare_qat(model, config.quant) if config.quant.enabled else None
    return model_config, model, qat


def start_or_resume(config: TrainConfig, model: nn.Module, backend: Collectives) -> int:
    """Rank 0 checks ``--out`` (fresh, --overwrite or --resume) and loads the checkpoint to
    resume from; every rank learns the outcome (an error is raised on every rank) and gets
    rank 0's model (its initialisation or checkpoint).  Returns the step to start from."""
    error, resume = None, None
    if backend.rank == 0:
        try:
            resume = prepare_out_dir(config)
            if resume is not None:
                model.load_state_dict(resume["model"])  # weights and QAT scales/counters
        except (ValueError, OSError, RuntimeError) as e:
            error = str(e) if isinstance(e, ValueError) else f"--out {config.out}: {e}"
    error, start_step = backend.broadcast_object((error, resume["step"] if resume else 0), name="resume")
    if error:
        raise ValueError(error)
    backend.broadcast_module(model)
    return start_step


def average_activation_scales(qat: QATState | None, backend: Collectives) -> None:
    """--act-bits: average the running activation scales over ranks after each step, so every
    replica quantizes the next batch with the same scales (step traffic of kind ``qat``).
    Nothing to do without activation quantization, while QAT is off, or on one rank."""
    if qat is None or not qat.enabled or backend.size == 1:
        return
    scales = qat.activation_scales()
    if scales:
        for s, avg in zip(scales, backend.allreduce_average(scales, name="qat.act_scale", kind="qat")):
            s.copy_(avg)


class _Training:
    """One run between set-up and summary: the exchange, data, run directory and counters."""

    def __init__(self, config: TrainConfig, backend: Collectives, device: torch.device, meta: DatasetMeta,
                 model_config: ModelConfig, model: DLRM, qat: QATState | None, start_step: int,
                 signals: StopSignals) -> None:
        self.config, self.backend, self.device, self.meta = config, backend, device, meta
        self.model_config, self.model, self.qat = model_config, model, qat
        self.sync = GradientSynchronizer(backend, model, model.embedding_parameter_names(), config.compression)
        self.comm_log = CommOverheadLog(backend)  # every rank's per-step comm figures, gathered to rank 0
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.train_reader = SplitReader(config.data, "train")
        self.batches = TrainBatches(self.train_reader, config.batch_size, backend.rank, backend.size, config.seed,
                                    config.prefetch)
        self.eval_readers = {s: SplitReader(config.data, s) for s in config.eval_splits if meta.rows.get(s, 0) > 0}
        self.total_steps = self.batches.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        if start_step >= self.total_steps:
            raise ValueError(f"--resume: the checkpoint is at step {start_step}, the run asks for "
                             f"{self.total_steps} steps in all: raise --epochs or --max-steps")
        self.start_step = self.step = start_step
        self.train_seconds = 0.0
        self.last: dict[str, dict[str, float]] = {}  # rank 0: latest metrics per split
        self.best_test: dict[str, Any] | None = None  # rank 0: the evaluation with the best test AUC
        self.saved_step: int | None = None  # step of the last checkpoint written
        self.schedule = CheckpointSchedule(backend, signals, config.checkpoint_every, config.checkpoint_minutes * 60)
        self.run = RunDir(config.out) if backend.rank == 0 else None
        if self.run:
            self._write_config()
        self.bar = tqdm(total=self.total_steps, initial=start_step, desc="train", unit="step", disable=not self.run,
                        dynamic_ncols=True, mininterval=bar_interval())

    def _write_config(self) -> None:
        config = self.config
        self.run.write_json("config.json", {"train": config.to_dict(), "model": self.model_config.to_dict(),
                                            "world_size": self.backend.size, "dataset": self.meta.to_dict(),
                                            "device": str(self.device), "threads": torch.get_num_threads()})
        if self.start_step:
            tqdm.write(f"[dqrm-train] resuming from {config.out / CHECKPOINT} at step {self.start_step}")
        if self.batches.dropped_per_epoch:
            tqdm.write(f"[dqrm-train] {self.batches.dropped_per_epoch} of {self.train_reader.num_rows} training "
                       f"rows do not fill a global batch of {config.batch_size} and are left out of each epoch "
                       f"(a different set every epoch)")

    def train_epochs(self) -> int:
        """Train until ``total_steps``, evaluating and checkpointing as configured; returns the last epoch."""
        config, per_epoch = self.config, self.batches.steps_per_epoch
        first_epoch = epoch = self.start_step // per_epoch
        self.model.train()
        for epoch in range(first_epoch, config.epochs):
            if self.step >= self.total_steps:
                break
            if self.qat is not None:
                self.qat.on_epoch(epoch)  # FP32 during --pretrain-epochs, quantization-aware after
            skip = self.start_step % per_epoch if epoch == first_epoch else 0
            for batch in self.batches.epoch(epoch, start_step=skip):
                self.train_step(batch, epoch)
                if config.eval_every and self.step % config.eval_every == 0:
                    self.evaluate(epoch)
                self.checkpoint_or_stop(epoch)
                if self.step >= self.total_steps:
                    break
            self.evaluate(epoch)
        self.bar.close()
        self.comm_log.flush(self.run.log if self.run else None)
        return epoch

    def train_step(self, batch, epoch: int) -> None:
        """One SGD step on this rank's share of the global batch, with gradients averaged over ranks."""
        t0 = time.perf_counter()
        if self.qat is not None:
            self.qat.on_step(self.step)  # full-table scale pass only at multiples of --scale-period
        batch = batch.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(batch.dense, batch.sparse), batch.label)
        loss.backward()
        self.sync.synchronize()
        self.optimizer.step()
        average_activation_scales(self.qat, self.backend)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss became {loss_value} at step {self.step}; lower --lr")
        seconds = time.perf_counter() - t0
        self.step += 1
        self.train_seconds += seconds
        traffic = self.comm_log.record_step(self.step)
        self.comm_log.maybe_flush(self.step, self.run.log if self.run else None)  # collective, same steps everywhere
        if self.run:
            self.run.log({"event": "step", "step": self.step, "epoch": epoch, "loss": loss_value,
                          "seconds": seconds, **traffic})
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)

    def evaluate(self, epoch: int) -> None:
        """Every configured split (collective); rank 0 logs the metrics and tracks the best test AUC."""
        for split, reader in self.eval_readers.items():
            result = evaluate(self.model, reader, self.backend, self.config.eval_batch_size, self.device)
            if not self.run or result is None:
                continue
            self.run.log({"event": "eval", "split": split, "epoch": epoch, "step": self.step, **result})
            self.last[split] = result
            if split == "test" and (self.best_test is None or result["auc"] > self.best_test["auc"]):
                self.best_test = {"epoch": epoch, "step": self.step, **result}
            tqdm.write(f"[dqrm-train] step {self.step} epoch {epoch} {split}: acc {result['accuracy']:.4f} "
                       f"auc {result['auc']:.4f} logloss {result['log_loss']:.4f}")

    def checkpoint_or_stop(self, epoch: int) -> None:
        """After a step: the checkpoint the schedule asks for; on SIGUSR1/SIGTERM (agreed by
        all ranks) also stop, raising ``Preempted`` everywhere, unless this was the last step."""
        decision = self.schedule.after_step(self.step)
        if decision.checkpoint:
            self.save_checkpoint(epoch)
        if decision.stop and self.step < self.total_steps:
            self.bar.close()
            self.comm_log.flush(self.run.log if self.run else None)
            if self.run:
                self.run.log({"event": "preempted", "step": self.step, "signal": decision.stop})
            raise Preempted(self.step, decision.stop, str(self.config.out / CHECKPOINT))

    def save_checkpoint(self, epoch: int) -> None:
        """Rank 0 writes ``checkpoint.pt`` for the current step."""
        if self.run and self.saved_step != self.step:
            self.run.save_checkpoint(checkpoint_state(self.model, self.model_config.to_dict(), self.config,
                                                      self.step, epoch))
            self.run.log({"event": "checkpoint", "step": self.step, "epoch": epoch})
            self.saved_step = self.step
        self.schedule.saved()

    def summary(self, last_epoch: int) -> dict[str, Any]:
        samples = (self.step - self.start_step) * self.config.batch_size
        return {
            "world_size": self.backend.size,
            "steps": self.step,
            "resumed_from_step": self.start_step,
            "epochs_started": last_epoch + 1,
            "samples": samples,
            "train_seconds": self.train_seconds,
            "samples_per_second": samples / self.train_seconds if self.train_seconds else 0.0,
            "rows_left_out_per_epoch": self.batches.dropped_per_epoch,
            "final": self.last,
            "best_test": self.best_test,
            **self.comm_log.summary_fields(),  # comm_*_per_step (this rank), comm_per_rank (rank 0)
            "error_feedback_bytes": self.sync.error_feedback_nbytes(),  # residual memory per rank at the end
            "planted": self.meta.extra.get("planted"),
            "qat": self.qat.summary() if self.qat is not None else None,
        }

    def finish(self, last_epoch: int) -> dict[str, Any]:
        """The summary; rank 0 writes summary.json, prints the report and the final checkpoint."""
        summary = self.summary(last_epoch)
        if self.run:
            self.run.write_json("summary.json", summary)
            tqdm.write(format_summary(summary))
            if self.saved_step != self.step:  # else the periodic checkpoint of this very step is the final one
                self.save_checkpoint(last_epoch)
        return summary

    def close(self) -> None:
        self.bar.close()
        if self.run:
            self.run.close()
        for reader in (self.train_reader, *self.eval_readers.values()):
            reader.close()
