"""Training run configuration (validated on construction)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..data.schema import NUM_SPARSE
from ..model.config import PRESETS, model_config_from_preset
from ..quant.config import QuantConfig
from ..compression.config import CompressionConfig
from .best_checkpoint import KEEP_BEST
from .log_config import LogConfig
from .optimizers import OptimConfig

FLOAT32_MAX = 3.4028234663852886e38  # the parameters are float32: a larger step size cannot be applied

DEVICES = ("auto", "cpu", "cuda")
# --resume: no (a fresh --out), yes (continue from out/checkpoint.pt, which must exist),
# auto (continue when out/checkpoint.pt exists, else start afresh: what a requeued job passes).
RESUME_MODES = ("no", "yes", "auto")


IN_MEMORY_MODES = ("auto", "yes", "no")
IN_MEMORY_AUTO_BYTES = 1 << 30  # auto: the splits a run reads, together, up to this size


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    batch_size is the global batch (split evenly across ranks); eval_every is in steps
    (0: only at the end of each epoch); max_steps (None: no limit) counts steps over all
    epochs; threads None means OMP_NUM_THREADS or this rank's share of the cores it may use;
    prefetch is the number of training batches a background thread reads ahead (0: each batch
    is read in the training thread; None: chosen by ``loop.batches_read_ahead``);
    data_in_memory is one of IN_MEMORY_MODES (``loop.splits_in_memory``);
    checkpoint_every is in steps and checkpoint_minutes in minutes of wall time (0: off; the
    last checkpoint is always written); resume is one of RESUME_MODES (True/False read as
    yes/no).
    keep_epoch_checkpoints also keeps the model of every epoch's end (``epoch_checkpoint.py``);
    keep_best (one of KEEP_BEST; a split among eval_splits, or none) the model of the best AUC
    on that split (``best_checkpoint.py``).
    lr is the base learning rate of both optimizers unless ``optim`` sets their own; ``optim``
    picks the tables' and MLPs' optimizers, the batch scaling and the schedule (default: plain
    SGD at a constant ``lr``).
    """

    data: Path
    out: Path
    preset: str = "kaggle"
    embedding_dim: int | None = None
    bottom_mlp: tuple[int, ...] | None = None
    top_mlp: tuple[int, ...] | None = None
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.1
    eval_every: int = 0
    eval_batch_size: int = 16384
    eval_splits: tuple[str, ...] = ("test", "val")
    seed: int = 0
    max_steps: int | None = None
    device: str = "auto"
    threads: int | None = None
    prefetch: int | None = None
    data_in_memory: str = "auto"
    checkpoint_every: int = 0
    checkpoint_minutes: float = 30.0
    resume: str = "no"
    overwrite: bool = False
    quant: QuantConfig = field(default_factory=QuantConfig)  # default: FP32, nothing quantized
    compression: CompressionConfig = field(default_factory=CompressionConfig)  # default: uncompressed
    optim: OptimConfig = field(default_factory=OptimConfig)  # default: plain SGD, constant lr
    keep_epoch_checkpoints: bool = False
    keep_best: str = "none"
    log: LogConfig = field(default_factory=LogConfig)  # progress, metrics.jsonl windows, TensorBoard
    stall_timeout: float = 600.0  # seconds one collective may wait before the job is ended; 0: never

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        if isinstance(self.resume, bool):
            object.__setattr__(self, "resume", "yes" if self.resume else "no")
        checks = [
            (self.preset in PRESETS, f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 < self.lr <= FLOAT32_MAX, f"lr must be > 0 and a float32 (<= {FLOAT32_MAX:.4g}), got {self.lr}"),
            (self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
            (self.prefetch is None or self.prefetch >= 0, f"prefetch must be >= 0, got {self.prefetch}"),
            (self.data_in_memory in IN_MEMORY_MODES,
             f"data_in_memory must be one of {IN_MEMORY_MODES}, got {self.data_in_memory!r}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (self.stall_timeout >= 0, f"stall_timeout must be >= 0, got {self.stall_timeout}"),
            (self.checkpoint_minutes >= 0, f"checkpoint_minutes must be >= 0, got {self.checkpoint_minutes}"),
            (self.resume in RESUME_MODES, f"resume must be one of {RESUME_MODES}, got {self.resume!r}"),
            (not (self.resume != "no" and self.overwrite), "resume and overwrite exclude each other"),
            (set(self.eval_splits) <= {"test", "val"}, f"eval_splits must be test and/or val, got {self.eval_splits}"),
            (self.keep_best in KEEP_BEST, f"keep_best must be one of {KEEP_BEST}, got {self.keep_best!r}"),
            (self.keep_best == "none" or self.keep_best in self.eval_splits,
             f"keep_best {self.keep_best} selects by the {self.keep_best} split's AUC: add {self.keep_best} to "
             f"eval_splits (now {', '.join(self.eval_splits)})"),
            (isinstance(self.quant, QuantConfig), f"quant must be a QuantConfig, got {type(self.quant).__name__}"),
            (isinstance(self.compression, CompressionConfig),
             f"compression must be a CompressionConfig, got {type(self.compression).__name__}"),
            (isinstance(self.log, LogConfig), f"log must be a LogConfig, got {type(self.log).__name__}"),
            (isinstance(self.optim, OptimConfig), f"optim must be an OptimConfig, got {type(self.optim).__name__}"),
            (getattr(self.quant, "pretrain_epochs", 0) < self.epochs,
             f"pretrain_epochs ({self.quant.pretrain_epochs}) must be below epochs ({self.epochs}): "
             "quantization-aware training starts after the FP32 pretraining"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        # The architecture fields are checked now, before any rank starts (cardinalities come later).
        model_config_from_preset(self.preset, [1] * NUM_SPARSE, self.embedding_dim, self.bottom_mlp, self.top_mlp)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
