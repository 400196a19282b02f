"""A streaming distribution of non-negative figures (bytes, seconds) in bounded memory.

The mean is exact (count and sum).  Percentiles come from a histogram whose bins are 1 %
apart on a log scale, so a percentile is within 0.5 % of the nearest-rank value, and the
histogram holds at most a few thousand bins whatever the number of values (about 230 per
decade of range in use; zeros are counted apart).
"""
from __future__ import annotations

import math

import numpy as np

RATIO = 1.01  # neighbouring bin edges
_LOG_RATIO = math.log(RATIO)


class StreamingDistribution:
    """Exact count, mean, min and max; p50 / p95 within 0.5 % (see the module doc)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.zeros = 0
        self.low = math.inf
        self.high = -math.inf
        self.bins: dict[int, int] = {}  # bin i holds values in [RATIO**i, RATIO**(i+1))

    def add(self, values: np.ndarray | list[float]) -> None:
        """Take a batch of values (any shape, all >= 0)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        if not np.all(v >= 0):  # also refuses NaN
            raise ValueError(f"StreamingDistribution takes values >= 0, got {v[~(v >= 0)][:3].tolist()}")
        self.count += int(v.size)
        self.total += float(v.sum())
        self.low, self.high = min(self.low, float(v.min())), max(self.high, float(v.max()))
        positive = v[v > 0]
        self.zeros += int(v.size - positive.size)
        index, counts = np.unique(np.floor(np.log(positive) / _LOG_RATIO).astype(np.int64), return_counts=True)
        for i, n in zip(index.tolist(), counts.tolist()):
            self.bins[i] = self.bins.get(i, 0) + n

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def quantile(self, q: float) -> float:
        """The nearest-rank ``q``-quantile (0 < q <= 1), within 0.5 %; 0.0 without values."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        if rank <= self.zeros:
            return 0.0
        seen = self.zeros
        for i in sorted(self.bins):
            seen += self.bins[i]
            if seen >= rank:
                return min(max(RATIO ** (i + 0.5), self.low), self.high)
        return self.high

    def summary(self) -> dict[str, float]:
        """``{"mean", "p50", "p95"}`` (the form of summary.json's communication figures)."""
        return {"mean": self.mean, "p50": self.quantile(0.5), "p95": self.quantile(0.95)}
