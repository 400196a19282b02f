"""The data-parallel training loop behind ``dqrm-train``.

``train`` reads as its steps: set up the model, start afresh or resume (rank 0 checks
``--out``), then per epoch train steps (forward, backward, gradient exchange, SGD step,
activation-scale averaging, logging), evaluate, checkpoint, and write the summary.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..comm.backend import HorovodBackend, core_share, default_threads
from ..comm.collectives import Collectives
from ..comm.sync import GradientSynchronizer
from ..data.reader import ROW_BYTES, Prefetcher, SplitReader, TrainBatches
from ..data.schema import DatasetMeta, read_meta
from ..locking import DirectoryLock
from ..model import DLRM, ModelConfig, model_config_from_preset
from ..quant.qat import QATState, prepare_qat
from .agreement import agree_finite, shard_rows
from .best_checkpoint import BestSelection, previous_selection
from .checkpoint import CHECKPOINT, checkpoint_state, prepare_out_dir
from .config import IN_MEMORY_AUTO_BYTES, TrainConfig
from .epoch_checkpoint import keep_epoch_checkpoint
from .evaluation import evaluate
from .failures import RankFailure, is_peer_shutdown, peer_failed
from .launcher_watch import LauncherWatch
from .optimizers import OptimConfig, TrainingOptimizer
from .preemption import CheckpointSchedule, Preempted, StopSignals
from .report import format_summary
from .run_dir import BEST_CHECKPOINT, RunDir
from .step_timer import StepTimer
from .training_log import TrainingLog
from .watchdog import HEARTBEAT_DIR, StallWatchdog, WatchedCollectives


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
        launcher = LauncherWatch(backend.rank).start()  # a signal that ends the launcher ends every rank
        lock = watchdog = None
        try:
            share = core_share(backend)
            torch.set_num_threads(config.threads or default_threads(backend, share))
            device = select_device(config.device, backend.local_rank)
            meta = read_meta(config.data)
            in_memory = splits_in_memory(config.data_in_memory, meta, ("train", *config.eval_splits))
            config = replace(config, data_in_memory="yes" if in_memory else "no",
                             prefetch=batches_read_ahead(config.prefetch, torch.get_num_threads(), share, device,
                                                         in_memory))
            model_config, model, qat = build_model(config, meta, device)
            lock = lock_out_dir(config, backend)
            if config.stall_timeout:
                watchdog = StallWatchdog(backend.rank, backend.size, config.stall_timeout,
                                         config.out / HEARTBEAT_DIR).start()
                backend = WatchedCollectives(backend, watchdog)
            start_step, optimizer_state = start_or_resume(config, model, backend)
            run = _Training(config, backend, device, meta, model_config, model, qat, start_step, signals, watchdog)
            if optimizer_state:
                run.optimizer.load_state_dict(optimizer_state)
            try:
                last_epoch = run.train_epochs()
                return run.finish(last_epoch)
            finally:
                run.close()
        except RuntimeError as e:
            if backend.size > 1 and is_peer_shutdown(e):
                raise peer_failed(backend.rank) from e
            raise
        finally:
            for held in (watchdog, launcher):
                if held is not None:
                    held.stop()
            if lock is not None:
                lock.release()


def splits_in_memory(mode: str, meta: DatasetMeta, splits: tuple[str, ...]) -> bool:
    """--data-in-memory: yes, no, or auto: yes when ``splits`` take at most
    IN_MEMORY_AUTO_BYTES together (``ROW_BYTES`` a row)."""
    if mode != "auto":
        return mode == "yes"
    return sum(meta.rows.get(s, 0) for s in set(splits)) * ROW_BYTES <= IN_MEMORY_AUTO_BYTES


def batches_read_ahead(prefetch: int | None, threads: int, cores: int, device: torch.device,
                       in_memory: bool = False) -> int:
    """--prefetch, else: 0 (each batch read in the training thread) from memory, and on a CPU
    rank whose torch threads fill its share of the cores, where a reading thread would take CPU
    from them in mid-step (benchmarks/train_options_ab.py, batch 128 on 2 cores: steps 9 %
    slower with a reading thread than reading in line); 4 batches ahead when a core is left
    over or a GPU computes."""
    if prefetch is not None:
        return prefetch
    return 4 if not in_memory and (device.type != "cpu" or threads < cores) else 0


def lock_out_dir(config: TrainConfig, backend: Collectives) -> DirectoryLock | None:
    """Rank 0 takes ``--out``'s lock for the life of the run (``locking.DirectoryLock``): a
    second run on the same directory is refused, on every rank, naming the first's host and
    pid.  Returns the lock on rank 0, None elsewhere."""
    error, lock = None, None
    if backend.rank == 0:
        try:
            lock = DirectoryLock(config.out, f"--out {config.out}").acquire()
        except (ValueError, OSError) as e:
            error = str(e) if isinstance(e, ValueError) else f"--out {config.out}: {e}"
    error = backend.broadcast_object(error, name="lock")
    if error:
        raise ValueError(error)
    return lock


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


def start_or_resume(config: TrainConfig, model: nn.Module, backend: Collectives) -> tuple[int, dict[str, Any]]:
    """Rank 0 checks ``--out`` (fresh, --overwrite or --resume) and loads the checkpoint to
    resume from; every rank learns the outcome (an error is raised on every rank) and gets
    rank 0's model (its initialisation or checkpoint) and optimizer state.  Returns the step
    to start from and the optimizer state to load (empty for a fresh run or plain SGD)."""
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
    optimizer_state = (resume or {}).get("optimizer") or {}
    if start_step and backend.size > 1 and config.optim.stateful:
        optimizer_state = backend.broadcast_object(optimizer_state, name="resume.optimizer")
    return start_step, optimizer_state


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
                 signals: StopSignals, watchdog: StallWatchdog | None = None) -> None:
        self.config, self.backend, self.device, self.meta = config, backend, device, meta
        self.model_config, self.model, self.qat = model_config, model, qat
        self.watchdog = watchdog
        self.sync = GradientSynchronizer(backend, model, model.embedding_parameter_names(), config.compression)
        self.loss_fn = nn.BCEWithLogitsLoss()
        in_memory = config.data_in_memory == "yes"
        self.train_reader = SplitReader(config.data, "train", in_memory)
        self.batches = TrainBatches(self.train_reader, config.batch_size, backend.rank, backend.size, config.seed,
                                    config.prefetch)
        self.epoch_batches: Prefetcher | None = None  # the epoch's batches, while it trains
        self.eval_readers = {s: SplitReader(config.data, s, in_memory) for s in config.eval_splits
                             if meta.rows.get(s, 0) > 0}
        self.total_steps = self.batches.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        if start_step >= self.total_steps:
            raise ValueError(f"--resume: the checkpoint is at step {start_step}, the run asks for "
                             f"{self.total_steps} steps in all: raise --epochs or --max-steps")
        self.start_step = self.step = start_step
        # its params: walked once, not every step; its rates follow the global step over the run's
        # epochs (--max-steps stops a run early, as a resumed run may then continue it)
        self.optimizer = TrainingOptimizer(model, model.embedding_parameter_names(), config.optim, config.lr,
                                           config.batch_size, self.batches.steps_per_epoch * config.epochs)
        self.saved_step: int | None = None  # step of the last checkpoint written
        self.evaluated_step: int | None = None  # step of the last evaluation
        self.schedule = CheckpointSchedule(backend, signals, config.checkpoint_every, config.checkpoint_minutes * 60)
        self.run = RunDir(config.out, resume_step=start_step) if backend.rank == 0 else None
        self.timer = StepTimer(device)  # where each step's time goes
        # metrics.jsonl, progress, TensorBoard, summary fields
        self.log = TrainingLog(backend, self.run, config.log, self.timer, batch_size=config.batch_size,
                               steps_per_epoch=self.batches.steps_per_epoch, total_steps=self.total_steps,
                               start_step=start_step, learning_rates=self.optimizer.learning_rates)
        self.best = self._best_selection() if self.run and config.keep_best != "none" else None  # rank 0
        if self.run:
            self._write_config()

    def _best_selection(self) -> BestSelection:
        """--keep-best: a fresh selection, or on --resume the one checkpoint-best.pt holds."""
        previous, problem = previous_selection(self.config.out) if self.start_step else (None, None)
        if problem:
            self.log.message(f"[dqrm-train] --keep-best: {problem}; the best model is selected afresh from here")
        return BestSelection(self.config.keep_best, previous)

    def _write_config(self) -> None:
        config = self.config
        self.run.write_json("config.json", {"train": config.to_dict(), "model": self.model_config.to_dict(),
                                            "world_size": self.backend.size, "dataset": self.meta.to_dict(),
                                            "device": str(self.device), "threads": torch.get_num_threads(),
                                            "steps_per_epoch": self.batches.steps_per_epoch,
                                            "total_steps": self.total_steps, "log_every": self.log.window_steps,
                                            "optimizer": self.optimizer.describe()})
        if self.backend.size == 1 and (notice := config.compression.single_rank_notice()):
            self.log.message(f"[dqrm-train] {notice}")
        if config.optim != OptimConfig():
            self.log.message(f"[dqrm-train] {self.optimizer.summary_line()}")
            if (end := self.optimizer.schedule_end) > self.total_steps:
                self.log.message(f"[dqrm-train] the learning-rate schedule runs over the {config.epochs} epoch(s) "
                                 f"(to step {end}); --max-steps stops this run at step {self.total_steps}")
        if self.start_step:
            self.log.message(f"[dqrm-train] resuming from {config.out / CHECKPOINT} at step {self.start_step}")
        if config.data_in_memory == "yes":
            rows = self.train_reader.num_rows + sum(r.num_rows for r in self.eval_readers.values())
            self.log.message(f"[dqrm-train] the training and evaluated splits are held in memory ({rows} rows, "
                             f"{rows * ROW_BYTES / 2**20:.0f} MiB on each rank; --data-in-memory no reads them "
                             f"from the shards)")
        if self.batches.dropped_per_epoch:
            self.log.message(f"[dqrm-train] {self.batches.dropped_per_epoch} of {self.train_reader.num_rows} "
                             f"training rows do not fill a global batch of {config.batch_size} and are left out "
                             f"of each epoch (a different set every epoch)")

    def train_epochs(self) -> int:
        """Train until ``total_steps``, evaluating and checkpointing as configured; returns the last epoch."""
        config, per_epoch = self.config, self.batches.steps_per_epoch
        first_epoch = epoch = self.start_step // per_epoch
        self.model.train()
        self.timer.restart()
        for epoch in range(first_epoch, config.epochs):
            if self.step >= self.total_steps:
                break
            if self.qat is not None:
                self.qat.on_epoch(epoch)  # FP32 during --pretrain-epochs, quantization-aware after
            skip = self.start_step % per_epoch if epoch == first_epoch else 0
            with self.batches.epoch(epoch, start_step=skip, refill_on_demand=True) as self.epoch_batches:
                for batch in self.timer.timed(self.epoch_batches):
                    self.train_step(batch, epoch)
                    if config.eval_every and self.step % config.eval_every == 0:
                        self.evaluate(epoch)
                    self.checkpoint_or_stop(epoch)
                    if self.step >= self.total_steps:
                        break
            self.log.end_epoch(self.step, epoch)
            self.evaluate(epoch)
            if config.keep_epoch_checkpoints and self.step % per_epoch == 0:
                self.save_epoch_checkpoint(epoch)
        return epoch

    def train_step(self, batch, epoch: int) -> None:
        """One optimizer step on this rank's share of the global batch, with gradients averaged over ranks."""
        batch = batch.to(self.device)
        self.timer.lap("data")
        if self.qat is not None:
            self.qat.on_step(self.step)  # full-table scale pass only at multiples of --scale-period
        self.timer.lap("scale_pass")
        self.optimizer.zero_grad()
        self.sync.begin_step()  # with --overlap, backward's hooks start the exchange bucket by bucket
        try:  # local computation only: an error here is this rank's, named with its batch
            loss = self.loss_fn(self.model(batch.dense, batch.sparse), batch.label)
            self.epoch_batches.refill()  # the next batch is read while backward runs without the GIL
            loss.backward()
            self.sync.backward_done()  # the step waits for the exchange from here (agreement included)
        except (RuntimeError, IndexError, ValueError) as e:
            raise RankFailure(f"rank {self.backend.rank}: step {self.step + 1} failed on its batch "
                              f"({self._batch_rows(0, len(batch.label) - 1)}): {type(e).__name__}: {e}") from e
        self.timer.lap("forward_backward")
        agree_finite(self.backend, loss, self.optimizer.params, batch.dense, self._batch_rows, self.step + 1,
                     self.config.lr)
        self.sync.synchronize(self.step)  # the global step: a top-k warm-up continues after --resume
        self.timer.lap("exchange")
        self.optimizer.step(self.step)
        self.timer.lap("optimizer")
        average_activation_scales(self.qat, self.backend)
        loss_value = float(loss.detach())
        self.step += 1
        if self.watchdog:
            self.watchdog.step = self.step
        self.log.after_step(self.step, epoch, loss_value)  # collective at the ends of logging windows

    def _batch_rows(self, i: int, j: int) -> str:
        """Where rows ``i..j`` of this rank's batch of the current step were read from."""
        per_epoch = self.batches.steps_per_epoch
        start = int(self.batches.batch_starts(self.step // per_epoch)[self.step % per_epoch])
        start += self.backend.rank * self.batches.local_batch
        return shard_rows(self.train_reader, start + i, start + j)

    def evaluate(self, epoch: int) -> None:
        """Every configured split (collective); rank 0 logs the metrics and tracks the best ones.
        Nothing to do when this step is already evaluated (an --eval-every interval that ends
        the epoch)."""
        if self.evaluated_step == self.step:
            return
        self.evaluated_step = self.step
        results = {}
        for split, reader in self.eval_readers.items():
            results[split] = result = evaluate(self.model, reader, self.backend, self.config.eval_batch_size,
                                               self.device, show_bar=self.log.eval_bars)
            self.timer.lap("eval")
            self.log.evaluated(self.step, epoch, split, result)
        if self.best is not None and self.best.consider(self.step, epoch, results):
            self.save_best_checkpoint(epoch)

    def save_best_checkpoint(self, epoch: int) -> None:
        """Rank 0 (--keep-best): the model just evaluated as checkpoint-best.pt, with its selection."""
        state = checkpoint_state(self.model, self.model_config.to_dict(), self.config, self.step, epoch,
                                 self.optimizer.state_dict())
        self.run.save_checkpoint({**state, "selected": self.best.selected}, BEST_CHECKPOINT)
        self.log.record({"event": "best", "file": BEST_CHECKPOINT, "split": self.best.split, "step": self.step,
                         "epoch": epoch, "auc": self.best.selected[self.best.split]["auc"]})
        self.timer.lap("checkpoint")

    def checkpoint_or_stop(self, epoch: int) -> None:
        """After a step: the checkpoint the schedule asks for; on SIGUSR1/SIGTERM (agreed by
        all ranks) also stop, raising ``Preempted`` everywhere, unless this was the last step."""
        decision = self.schedule.after_step(self.step)
        if decision.checkpoint:
            self.save_checkpoint(epoch)
        if decision.stop and self.step < self.total_steps:  # the checkpoint above ended the log's window
            self.log.record({"event": "preempted", "step": self.step, "signal": decision.stop})
            raise Preempted(self.step, decision.stop, str(self.config.out / CHECKPOINT))

    def save_checkpoint(self, epoch: int) -> None:
        """Every rank, after the same step: ends the log's window (collective unless no step was
        taken since), then rank 0 writes ``checkpoint.pt`` for the current step (metrics.jsonl
        complete up to it).  Nothing to do when this step is already saved."""
        if self.saved_step == self.step:
            return
        self.log.end_window(epoch)  # collective; a no-op after the last step (finish: rank 0 only)
        if self.run:
            self.run.save_checkpoint(checkpoint_state(self.model, self.model_config.to_dict(), self.config,
                                                      self.step, epoch, self.optimizer.state_dict()))
            self.log.record({"event": "checkpoint", "step": self.step, "epoch": epoch})
        self.saved_step = self.step
        self.schedule.saved()
        self.timer.lap("checkpoint")

    def save_epoch_checkpoint(self, epoch: int) -> None:
        """Rank 0 writes ``checkpoint.pt`` at the end of ``epoch`` and keeps it as
        ``checkpoint-epoch{epoch}.pt`` (--keep-epoch-checkpoints)."""
        self.save_checkpoint(epoch)
        if self.run:
            keep_epoch_checkpoint(self.run.path, epoch)
        self.timer.lap("checkpoint")

    def summary(self, last_epoch: int) -> dict[str, Any]:
        return {
            "world_size": self.backend.size,
            "steps": self.step,
            "resumed_from_step": self.start_step,
            "epochs_started": last_epoch + 1,
            "samples": (self.step - self.start_step) * self.config.batch_size,
            "rows_left_out_per_epoch": self.batches.dropped_per_epoch,
            # train_seconds, samples_per_second, step_time, train_loss, final, best, best_test, comm_*
            **self.log.summary_fields(),
            "error_feedback_bytes": self.sync.error_feedback_nbytes(),  # residual memory per rank at the end
            "planted": self.meta.extra.get("planted"),
            "qat": self.qat.summary() if self.qat is not None else None,
            **({self.best.summary_key: self.best.selected} if self.best is not None else {}),
        }

    def finish(self, last_epoch: int) -> dict[str, Any]:
        """The summary; rank 0 writes summary.json, prints the report and the final checkpoint."""
        summary = self.summary(last_epoch)
        if self.run:
            self.run.write_json("summary.json", summary)
            self.log.message(format_summary(summary))
            if self.saved_step != self.step:  # else the periodic checkpoint of this very step is the final one
                self.save_checkpoint(last_epoch)
        return summary

    def close(self) -> None:
        self.log.close()
        if self.run:
            self.run.close()
        for reader in (self.train_reader, *self.eval_readers.values()):
            reader.close()
