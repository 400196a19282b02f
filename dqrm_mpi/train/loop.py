"""The data-parallel training loop behind ``dqrm-train``."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..comm.backend import HorovodBackend, default_threads
from ..comm.overhead import CommOverheadLog, dist
from ..comm.sync import GradientSynchronizer
from ..data.reader import SplitReader, TrainBatches, eval_batches
from ..data.schema import read_meta
from ..model import DLRM, model_config_from_preset
from ..quant.qat import prepare_qat
from .config import TrainConfig
from .metrics import binary_metrics
from .report import format_summary
from .checkpoint import CHECKPOINT, checkpoint_state, prepare_out_dir
from .run_dir import RunDir


def _bar_interval() -> float:
    """Seconds between progress-bar refreshes: live on a terminal, every 10 s in logs (horovodrun pipes)."""
    return 0.1 if sys.stderr.isatty() else 10.0


def select_device(name: str, local_rank: int) -> torch.device:
    """auto: the GPU of this local rank when torch sees CUDA, else the CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device on this node")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, reader: SplitReader, backend: HorovodBackend, batch: int,
             device: torch.device) -> dict[str, float] | None:
    """Metrics over every row of the split, computed once from all ranks' predictions.

    Returns the metrics on rank 0 and None elsewhere.
    """
    was_training = model.training
    model.eval()
    probs, labels = [], []
    share = reader.num_rows // backend.size  # rank 0's rows (eval_batches), the rank that shows the bar
    for b in tqdm(eval_batches(reader, batch, backend.rank, backend.size), desc=f"eval {reader.split}",
                  unit="batch", total=-(-share // batch), leave=False, disable=backend.rank != 0,
                  mininterval=_bar_interval()):
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


@dataclass
class _Stats:
    steps: int = 0
    train_seconds: float = 0.0
    comm_bytes_sent: list[int] = field(default_factory=list)
    comm_bytes_received: list[int] = field(default_factory=list)
    comm_seconds: list[float] = field(default_factory=list)
    best_test: dict[str, Any] | None = None
    last: dict[str, dict[str, float]] = field(default_factory=dict)


def train(config: TrainConfig, backend: HorovodBackend | None = None) -> dict[str, Any]:
    """Run training as configured; returns the summary (on every rank; rank 0 writes files)."""
    backend = backend or HorovodBackend()
    rank0 = backend.rank == 0
    torch.set_num_threads(config.threads or default_threads(backend.local_size))
    device = select_device(config.device, backend.local_rank)

    meta = read_meta(config.data)
    model_config = model_config_from_preset(config.preset, meta.cardinalities, config.embedding_dim,
                                            config.bottom_mlp, config.top_mlp)
    torch.manual_seed(config.seed)
    model = DLRM(model_config).to(device)
    # Before the broadcast: QAT scales, counters and modes are buffers, so rank 0's reach every rank.
    qat = prepare_qat(model, config.quant) if config.quant.enabled else None
    # Rank 0 checks --out (fresh, --overwrite or --resume); every rank learns the outcome.
    error, resume = None, None
    if rank0:
        try:
            resume = prepare_out_dir(config)
            if resume is not None:
                model.load_state_dict(resume["model"])  # weights and QAT scales/counters
        except (ValueError, OSError, RuntimeError) as e:  # raised on every rank below, not on rank 0 alone
            error = str(e) if isinstance(e, ValueError) else f"--out {config.out}: {e}"
    error, start_step = backend.broadcast_object((error, resume["step"] if resume else 0), name="resume")
    if error:
        raise ValueError(error)
    backend.broadcast_module(model)  # rank 0's initialisation (or checkpoint) everywhere
    sync = GradientSynchronizer(backend, model, model.embedding_parameter_names(), config.compression)
    comm_log = CommOverheadLog(backend)  # every rank's per-step comm figures, gathered to rank 0
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    loss_fn = nn.BCEWithLogitsLoss()

    train_reader = SplitReader(config.data, "train")
    batches = TrainBatches(train_reader, config.batch_size, backend.rank, backend.size, config.seed,
                           config.prefetch)
    eval_readers = {s: SplitReader(config.data, s) for s in config.eval_splits if meta.rows.get(s, 0) > 0}
    total_steps = batches.steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    if start_step >= total_steps:
        raise ValueError(f"--resume: the checkpoint is at step {start_step}, the run asks for {total_steps} steps "
                         f"in all: raise --epochs or --max-steps")

    run = RunDir(config.out) if rank0 else None
    if run:
        run.write_json("config.json", {"train": config.to_dict(), "model": model_config.to_dict(),
                                       "world_size": backend.size, "dataset": meta.to_dict(),
                                       "device": str(device), "threads": torch.get_num_threads()})
        if start_step:
            tqdm.write(f"[dqrm-train] resuming from {config.out / CHECKPOINT} at step {start_step}")
        if batches.dropped_per_epoch:
            tqdm.write(f"[dqrm-train] {batches.dropped_per_epoch} of {train_reader.num_rows} training rows "
                       f"do not fill a global batch of {config.batch_size} and are left out of each epoch "
                       f"(a different set every epoch)")
    stats = _Stats(steps=start_step)
    saved_step = None  # step of the last checkpoint written

    def run_eval(epoch: int, step: int) -> None:
        for split, reader in eval_readers.items():
            result = evaluate(model, reader, backend, config.eval_batch_size, device)
            if run and result is not None:
                record = {"event": "eval", "split": split, "epoch": epoch, "step": step, **result}
                run.log(record)
                stats.last[split] = result
                if split == "test" and (stats.best_test is None or result["auc"] > stats.best_test["auc"]):
                    stats.best_test = {"epoch": epoch, "step": step, **result}
                tqdm.write(f"[dqrm-train] step {step} epoch {epoch} {split}: acc {result['accuracy']:.4f} "
                           f"auc {result['auc']:.4f} logloss {result['log_loss']:.4f}")

    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not rank0,
               dynamic_ncols=True, mininterval=_bar_interval())
    first_epoch = epoch = start_step // batches.steps_per_epoch
    model.train()
    for epoch in range(first_epoch, config.epochs):
        if stats.steps >= total_steps:
            break
        if qat is not None:
            qat.on_epoch(epoch)  # FP32 during --pretrain-epochs, quantization-aware after
        skip = start_step % batches.steps_per_epoch if epoch == first_epoch else 0
        for batch in batches.epoch(epoch, start_step=skip):
            t0 = time.perf_counter()
            if qat is not None:
                qat.on_step(stats.steps)  # full-table scale pass only at multiples of --scale-period
            batch = batch.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch.dense, batch.sparse), batch.label)
            loss.backward()
            sync.synchronize()
            optimizer.step()
            act_scales = qat.activation_scales() if qat is not None else []
            if act_scales and backend.size > 1:  # --act-bits only: keeps replicas identical
                for s, avg in zip(act_scales, backend.allreduce_average(act_scales, name="qat.act_scale", kind="qat")):
                    s.copy_(avg)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss became {loss_value} at step {stats.steps}; lower --lr")
            seconds = time.perf_counter() - t0
            stats.steps += 1
            stats.train_seconds += seconds
            traffic = backend.traffic.take()
            stats.comm_bytes_sent.append(traffic["comm_bytes_sent"])
            stats.comm_bytes_received.append(traffic["comm_bytes_received"])
            stats.comm_seconds.append(traffic["comm_seconds"])
            comm_log.add(stats.steps, traffic)
            comm_log.maybe_flush(stats.steps, run.log if run else None)  # collective, same steps everywhere
            if run:
                run.log({"event": "step", "step": stats.steps, "epoch": epoch, "loss": loss_value,
                         "seconds": seconds, **traffic})
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if config.eval_every and stats.steps % config.eval_every == 0:
                run_eval(epoch, stats.steps)
            if run and config.checkpoint_every and stats.steps % config.checkpoint_every == 0:
                run.save_checkpoint(checkpoint_state(model, model_config.to_dict(), config, stats.steps, epoch))
                saved_step = stats.steps
            if stats.steps >= total_steps:
                break
        run_eval(epoch, stats.steps)
    bar.close()
    comm_log.flush(run.log if run else None)

    samples = (stats.steps - start_step) * config.batch_size
    summary = {
        "world_size": backend.size,
        "steps": stats.steps,
        "resumed_from_step": start_step,
        "epochs_started": epoch + 1,
        "samples": samples,
        "train_seconds": stats.train_seconds,
        "samples_per_second": samples / stats.train_seconds if stats.train_seconds else 0.0,
        "rows_left_out_per_epoch": batches.dropped_per_epoch,
        "final": stats.last,
        "best_test": stats.best_test,
        "comm_bytes_sent_per_step": dist(stats.comm_bytes_sent),
        "comm_bytes_received_per_step": dist(stats.comm_bytes_received),
        "comm_seconds_per_step": dist(stats.comm_seconds),
        "comm_per_rank": comm_log.summary() if rank0 else None,
        "error_feedback_bytes": sync.error_feedback_nbytes(),  # residual memory per rank at the end
        "planted": meta.extra.get("planted"),
        "qat": qat.summary() if qat is not None else None,
    }
    if run:
        run.write_json("summary.json", summary)
        tqdm.write("[dqrm-train] communication per step and rank:\n" + comm_log.format_summary(summary["comm_per_rank"]))
        tqdm.write(format_summary(summary))
        if saved_step != stats.steps:  # else the periodic checkpoint of this very step is the final one
            run.save_checkpoint(checkpoint_state(model, model_config.to_dict(), config, stats.steps, epoch))
        run.close()
    for reader in (train_reader, *eval_readers.values()):
        reader.close()
    return summary
