"""Learning-rate schedules: linear warm-up, constant, polynomial decay to an end value (the
reference DLRM's ``LRPolicyScheduler`` and MLPerf DLRM's recipe), and the batch-size scaling
rules for a changed global batch.

Step ``s`` counts global steps from 0 (the first update).  With ``W`` warm-up steps, decay
from step ``S`` over ``D`` steps with power ``p`` and end factor ``e`` (``lr_end / lr``), the
factor that multiplies each optimizer's base learning rate is

    (s + 1) / W                          for s < W
    e + (1 - e) * (1 - (s - S) / D)^p    for S <= s < S + D
    e                                    for s >= S + D (when D > 0)
    1                                    otherwise

so the first step takes 1 / W of the rate and the decay starts from the full rate at step S.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

LR_SCALING = ("none", "linear", "sqrt")


def scaled_lr(lr: float, rule: str, batch_size: int, base_batch: int) -> float:
    """``lr`` tuned at global batch ``base_batch`` for global batch ``batch_size``: none keeps
    it, linear multiplies it by batch_size / base_batch (Goyal et al. 2017), sqrt by the
    square root of that ratio (Krizhevsky 2014; usual for Adagrad and Adam)."""
    if rule not in LR_SCALING:
        raise ValueError(f"lr_scaling must be one of {LR_SCALING}, got {rule!r}")
    ratio = batch_size / base_batch
    return lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


@dataclass(frozen=True)
class LRSchedule:
    """warmup_steps W, decay_start S (None: the decay ends with the run, S = total - D),
    decay_steps D (0: no decay), decay_power p, end_factor e (the rate after the decay, as a
    fraction of the base rate).  ``resolved(total_steps)`` fixes S and checks the schedule
    against the run's length."""

    warmup_steps: int = 0
    decay_start: int | None = None
    decay_steps: int = 0
    decay_power: float = 2.0
    end_factor: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (self.warmup_steps >= 0, f"lr_warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.decay_start is None or self.decay_start >= 0,
             f"lr_decay_start must be >= 0, got {self.decay_start}"),
            (self.decay_steps >= 0, f"lr_decay_steps must be >= 0, got {self.decay_steps}"),
            (self.decay_power > 0, f"lr_decay_power must be > 0, got {self.decay_power}"),
            (0 <= self.end_factor <= 1, f"lr_end must be between 0 and the base learning rate (a fraction "
                                        f"{self.end_factor:g} of it)"),
            (self.decay_start is None or self.decay_steps > 0,
             "lr_decay_start needs lr_decay_steps (the length of the decay)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def constant(self) -> bool:
        return self.warmup_steps == 0 and self.decay_steps == 0

    def resolved(self, total_steps: int) -> "LRSchedule":
        """This schedule with ``decay_start`` fixed for a run of ``total_steps`` steps; raises
        ValueError naming dqrm-train's options when warm-up or decay do not fit in the run."""
        if self.warmup_steps > total_steps:
            raise ValueError(f"--lr-warmup-steps ({self.warmup_steps}) is longer than the run ({total_steps} steps in --epochs)")
        if not self.decay_steps:
            return self
        if self.decay_steps > total_steps:
            raise ValueError(f"--lr-decay-steps ({self.decay_steps}) is longer than the run ({total_steps} steps in "
                             "--epochs)")
        start = total_steps - self.decay_steps if self.decay_start is None else self.decay_start
        if start + self.decay_steps > total_steps:
            raise ValueError(f"--lr-decay-start + --lr-decay-steps ({start} + {self.decay_steps}) ends past the "
                             f"run ({total_steps} steps in --epochs)")
        if start < self.warmup_steps:
            raise ValueError(f"the decay starts (step {start}: --lr-decay-start, or the run's {total_steps} steps "
                             f"minus --lr-decay-steps) before the warm-up ends (--lr-warmup-steps "
                             f"{self.warmup_steps})")
        return replace(self, decay_start=start)

    def factor(self, step: int) -> float:
        """The multiplier of the base rates at global step ``step`` (from 0); call on a
        ``resolved`` schedule."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay_steps:
            done = step - self.decay_start
            if done >= self.decay_steps:
                return self.end_factor
            if done >= 0:
                e = self.end_factor
                return e + (1 - e) * (1 - done / self.decay_steps) ** self.decay_power
        return 1.0
