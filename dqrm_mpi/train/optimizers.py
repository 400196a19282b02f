"""The optimizers of ``dqrm-train``, one for the embedding tables and one for the MLPs, each
with its base learning rate, both driven by one ``LRSchedule``.

Tables (the flat table's sparse gradient: only the looked-up rows and their state change):

  sgd              w -= lr * g, duplicate ids applied one after another (``PlainSGD``; the
                   reference DLRM's optimizer, unchanged bit for bit)
  rowwise-adagrad  duplicate ids summed first; per row a = a + mean_j(g_j^2) (one float per
                   row), w -= lr / (sqrt(a) + eps) * g (fbgemm's EXACT_ROWWISE_ADAGRAD, the
                   reference DLRM's rwsadagrad; eps 1e-8 as fbgemm)
  adagrad          duplicate ids summed first; per value a = a + g^2 (a table-sized state),
                   w -= lr * g / (sqrt(a) + eps) (torch.optim.Adagrad's sparse rule, eps 1e-10)

MLPs (dense gradients): sgd (``PlainSGD``), adagrad (torch.optim.Adagrad), adam
(torch.optim.Adam) and lamb (Adam's moments with a per-tensor trust ratio, You et al. 2020).

Every update follows from the gradient every rank holds after the exchange (averaged), so
optimizer state is the same on every rank; ``state_dict`` goes into ``checkpoint.pt``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..model.dlrm import table_memory
from .schedule import LR_SCALING, LRSchedule, scaled_lr
from .sgd import PlainSGD

EMB_OPTIMIZERS = ("sgd", "rowwise-adagrad", "adagrad")
MLP_OPTIMIZERS = ("sgd", "adagrad", "adam", "lamb")
ROWWISE_ADAGRAD_EPS = 1e-8  # fbgemm / torchrec's default
ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's default, the reference DLRM's
ADAM_EPS = 1e-8  # torch.optim.Adam's default
LAMB_EPS = 1e-6  # NVIDIA apex FusedLAMB's, MLPerf DLRM's
BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class OptimConfig:
    """emb_optimizer / mlp_optimizer: one of EMB_OPTIMIZERS / MLP_OPTIMIZERS; emb_lr / mlp_lr:
    their base rates (None: the run's ``lr``); lr_scaling (one of LR_SCALING) with
    lr_base_batch: the batch the rates were tuned for; schedule: warm-up and decay."""

    emb_optimizer: str = "sgd"
    mlp_optimizer: str = "sgd"
    emb_lr: float | None = None
    mlp_lr: float | None = None
    lr_scaling: str = "none"
    lr_base_batch: int = 128
    schedule: LRSchedule = field(default_factory=LRSchedule)

    def __post_init__(self) -> None:
        checks = [
            (self.emb_optimizer in EMB_OPTIMIZERS,
             f"emb_optimizer must be one of {EMB_OPTIMIZERS}, got {self.emb_optimizer!r}"),
            (self.mlp_optimizer in MLP_OPTIMIZERS,
             f"mlp_optimizer must be one of {MLP_OPTIMIZERS}, got {self.mlp_optimizer!r}"),
            (self.emb_lr is None or self.emb_lr > 0, f"emb_lr must be > 0, got {self.emb_lr}"),
            (self.mlp_lr is None or self.mlp_lr > 0, f"mlp_lr must be > 0, got {self.mlp_lr}"),
            (self.lr_scaling in LR_SCALING, f"lr_scaling must be one of {LR_SCALING}, got {self.lr_scaling!r}"),
            (self.lr_base_batch >= 1, f"lr_base_batch must be >= 1, got {self.lr_base_batch}"),
            (isinstance(self.schedule, LRSchedule), f"schedule must be an LRSchedule, got {self.schedule!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def stateful(self) -> bool:
        """Whether an optimizer keeps state (checkpointed, broadcast on resume): all but SGD."""
        return self.emb_optimizer != "sgd" or self.mlp_optimizer != "sgd"

    def base_lrs(self, lr: float, batch_size: int) -> dict[str, float]:
        """{"emb": rate, "mlp": rate} before the schedule, scaled for ``batch_size``."""
        return {part: scaled_lr(own if own is not None else lr, self.lr_scaling, batch_size, self.lr_base_batch)
                for part, own in (("emb", self.emb_lr), ("mlp", self.mlp_lr))}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "OptimConfig":
        """The inverse of ``asdict`` (a checkpoint's or config.json's ``optim``); None: the default."""
        if not d:
            return cls()
        return cls(**{**d, "schedule": LRSchedule(**d.get("schedule", {}))})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of float32 ``x`` (through float64)."""
    return x.double().sqrt_().float()


def adagrad_rows_(weight: torch.Tensor, state: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                  lr: float, eps: float) -> None:
    """Adagrad on rows ``rows`` int64 [n] (unique) of ``weight`` float32 [R, d] with their
    summed gradients ``values`` [n, d]: row-wise when ``state`` is [R] (the mean of the squared
    row, summed column by column, as ``kernels.ops.emb_adagrad_sparse_`` does), element-wise when
    it is [R, d].  The PyTorch path of the kernel, same bits (the square root taken in float64
    and rounded: correctly rounded as std::sqrt, where torch's float32 kernel is not)."""
    if state.dim() == 1:
        squares = values[:, 0] * values[:, 0]
        for j in range(1, values.shape[1]):
            squares = squares + values[:, j] * values[:, j]
        acc = state.index_select(0, rows) + squares / values.shape[1]
        state.index_copy_(0, rows, acc)
        step = torch.full_like(acc, lr).div_(_sqrt(acc).add_(eps)).unsqueeze(1) * values
    else:
        acc = state.index_select(0, rows) + values * values
        state.index_copy_(0, rows, acc)
        step = (values / _sqrt(acc).add_(eps)).mul_(lr)
    weight.index_copy_(0, rows, weight.index_select(0, rows) - step)


class TableAdagrad:
    """Row-wise or element-wise Adagrad of the flat table (``param`` float32 [R, d], sparse
    gradient): duplicate ids summed (``coalesce``), then only those rows and their state
    updated, in the fused CPU kernel where it applies (``adagrad_rows_`` otherwise)."""

    def __init__(self, param: nn.Parameter, lr: float, rowwise: bool) -> None:
        self.param, self.lr, self.rowwise = param, lr, rowwise
        self.eps = ROWWISE_ADAGRAD_EPS if rowwise else ADAGRAD_EPS
        rows, dim = param.shape
        if param.is_cpu:  # random rows of a large state: in huge pages as the table (table_memory)
            self.state = table_memory(rows, 1 if rowwise else dim).zero_()
            self.state = self.state.view(rows) if rowwise else self.state
        else:
            self.state = torch.zeros((rows,) if rowwise else (rows, dim), device=param.device)

    @torch.no_grad()
    def step(self) -> None:
        g = self.param.grad
        if g is None:
            return
        g = g.coalesce()
        rows, values = g._indices()[0], g._values()
        p = self.param
        if (kernels.enabled() and p.is_cpu and p.dtype == torch.float32 and p.is_contiguous()
                and values.dtype == torch.float32):
            kernels.ops.emb_adagrad_sparse_(p, self.state, rows, values, self.lr, self.eps)
        else:
            adagrad_rows_(p, self.state, rows, values, self.lr, self.eps)

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sum"].shape != self.state.shape:
            raise ValueError(f"the checkpoint's table optimizer state is {tuple(state['sum'].shape)}, this "
                             f"model's {tuple(self.state.shape)}")
        self.state.copy_(state["sum"])


class Lamb(torch.optim.Optimizer):
    """LAMB without weight decay: Adam's bias-corrected moments give u = m_hat / (sqrt(v_hat) + eps),
    then p -= lr * (||p|| / ||u||) * u per tensor (trust ratio 1 where either norm is 0)."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = BETAS, eps: float = LAMB_EPS) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = (m / (1 - b1 ** t)).div_((v / (1 - b2 ** t)).sqrt_().add_(group["eps"]))
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(update.mul_(trust * group["lr"]))


class _TorchPart:
    """A torch.optim optimizer whose rate is set before each step."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def step(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


class _SGDPart(PlainSGD):
    """PlainSGD, stateless: its checkpoint state is empty."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _table_part(name: str, param: nn.Parameter, lr: float):
    if name == "sgd":
        return _SGDPart([param], lr)
    return TableAdagrad(param, lr, rowwise=name == "rowwise-adagrad")


def _mlp_part(name: str, params: list[nn.Parameter], lr: float):
    if name == "sgd":
        return _SGDPart(params, lr)
    if name == "adagrad":
        return _TorchPart(torch.optim.Adagrad(params, lr=lr, eps=ADAGRAD_EPS))
    if name == "adam":
        return _TorchPart(torch.optim.Adam(params, lr=lr, betas=BETAS, eps=ADAM_EPS))
    return _TorchPart(Lamb(params, lr))


class TrainingOptimizer:
    """The tables' and the MLPs' optimizers of one model, the schedule over both.

    ``step(s)`` sets each part's rate for global step ``s`` (from 0) and updates;
    ``params`` lists every trained parameter (the finite check walks it)."""

    def __init__(self, model: nn.Module, sparse_names: set[str], config: OptimConfig, lr: float, batch_size: int,
                 total_steps: int) -> None:
        """total_steps: the run's length, over which ``config.schedule`` is resolved."""
        self.config = config
        self.base = config.base_lrs(lr, batch_size)
        self.schedule = config.schedule.resolved(total_steps)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        tables = [p for n, p in named if n in sparse_names]
        dense = [p for n, p in named if n not in sparse_names]
        if len(tables) > 1:
            raise ValueError(f"one flat embedding table expected, got {len(tables)} sparse parameters")
        self.parts = {}
        if tables:
            self.parts["emb"] = _table_part(config.emb_optimizer, tables[0], self.base["emb"])
        if dense:
            self.parts["mlp"] = _mlp_part(config.mlp_optimizer, dense, self.base["mlp"])

    @property
    def schedule_end(self) -> int:
        """The step where the schedule's last phase (warm-up or decay) ends."""
        s = self.schedule
        return max(s.warmup_steps, s.decay_start + s.decay_steps if s.decay_steps else 0)

    def learning_rates(self, step: int) -> dict[str, float]:
        """{"emb": rate, "mlp": rate} of global step ``step``."""
        f = self.schedule.factor(step)
        return {part: rate * f for part, rate in self.base.items()}

    def describe(self) -> dict[str, Any]:
        """config.json's ``optimizer``: each part's optimizer and base rate (scaled for the
        batch), and the schedule resolved for the run."""
        names = {"emb": self.config.emb_optimizer, "mlp": self.config.mlp_optimizer}
        return {part: {"optimizer": names[part], "lr": rate} for part, rate in self.base.items()} | {
            "schedule": asdict(self.schedule)}

    def summary_line(self) -> str:
        """One line for the user, e.g. 'tables rowwise-adagrad lr 0.02, MLPs sgd lr 0.8; warm-up
        100 steps; decay from step 900 over 100 steps (power 2) to 0 of the rate'."""
        c, s = self.config, self.schedule
        line = f"tables {c.emb_optimizer} lr {self.base['emb']:g}, MLPs {c.mlp_optimizer} lr {self.base['mlp']:g}"
        if c.lr_scaling != "none":
            line += f" ({c.lr_scaling} scaling from batch {c.lr_base_batch})"
        if s.warmup_steps:
            line += f"; warm-up {s.warmup_steps} steps"
        if s.decay_steps:
            line += (f"; decay from step {s.decay_start} over {s.decay_steps} steps (power {s.decay_power:g}) "
                     f"to {s.end_factor:g} of the rate")
        return line

    def step(self, step: int) -> None:
        """Set each part's rate for global step ``step`` (from 0), then update."""
        rates = self.learning_rates(step)
        for name, part in self.parts.items():
            part.lr = rates[name]
            part.step()

    def zero_grad(self) -> None:
        """Gradients become None (the next backward stores fresh ones, sparse ones included)."""
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Each part's state from ``state_dict()``'s; ValueError when a stateful part has none."""
        for name, part in self.parts.items():
            own = getattr(self.config, f"{name}_optimizer")
            if own != "sgd" and name not in state:
                raise ValueError(f"the checkpoint holds no state for the {name} optimizer ({own})")
            part.load_state_dict(state.get(name, {}))
