"""The options of `dqrm-prep criteo`: one frozen object, checked when it is made."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InputError

PIECE_BYTES = 32 << 20
# The options that decide the output: recorded in meta.json and compared on resume.
OUTPUT_FIELDS = ("dataset", "max_ind_range", "freq_threshold", "sub_sample_rate", "seed", "shard_rows",
                 "bad_lines", "label_dtype")


@dataclass(frozen=True)
class PrepOptions:
    """Options of `dqrm-prep criteo`.  The first group decides the output (``OUTPUT_FIELDS``);
    the second only how it is made.  Raises InputError naming the option when one is out
    of range."""

    dataset: str = "auto"
    max_ind_range: int | None = None
    freq_threshold: int = 0
    sub_sample_rate: float = 0.0
    seed: int = 0
    shard_rows: int = 1_000_000
    bad_lines: str = "error"
    label_dtype: str = "uint8"

    workers: int = 1
    progress: bool = True
    overwrite: bool = False
    keep_temp: bool = False
    piece_bytes: int = PIECE_BYTES

    def __post_init__(self) -> None:
        if self.max_ind_range is not None and not 1 <= self.max_ind_range <= 2**32:
            raise InputError(f"--max-ind-range must be in 1 .. 2^32, got {self.max_ind_range}")
        if self.freq_threshold < 0:
            raise InputError(f"--freq-threshold must be >= 0, got {self.freq_threshold}")
        if not 0.0 <= self.sub_sample_rate < 1.0:
            raise InputError(f"--sub-sample-rate must be in [0, 1), got {self.sub_sample_rate}")
        if self.shard_rows < 1:
            raise InputError(f"--shard-rows must be >= 1, got {self.shard_rows}")
        if self.bad_lines not in ("error", "skip"):
            raise InputError(f"--bad-lines must be error or skip, got {self.bad_lines!r}")
        if self.label_dtype not in ("uint8", "float32"):
            raise InputError(f"--label-dtype must be uint8 or float32, got {self.label_dtype!r}")
        if self.workers < 1:
            raise InputError(f"--workers must be >= 1, got {self.workers}")

    def output_options(self) -> dict[str, Any]:
        """The options that decide the output, by name."""
        return {k: getattr(self, k) for k in OUTPUT_FIELDS}
