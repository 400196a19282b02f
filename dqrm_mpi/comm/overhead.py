"""Per-iteration communication overhead of every rank: the one source of the run's
communication figures (metrics.jsonl's step and comm lines, summary.json's comm fields).

After every step, ``record_step`` takes the step's traffic from the backend's meter (which
starts afresh) and keeps this rank's figures of the step in a buffer.  Every rank's
buffers reach rank 0 through one ``allgather_object`` (not counted as step traffic) at the
end of each logging window (``flush``) and, within long windows, every ``gather_every``
steps (``maybe_gather``), so a rank holds at most ``gather_every`` steps of figures.
Rank 0 folds them into per-rank streaming distributions (exact mean, p50 / p95 within
0.5 %, bounded memory: ``distribution.py``) and, per window, writes one
``{"event": "comm", "step": last, "first_step": first, "steps": n, "ranks": [...]}`` line
with every rank's figures as means per step over the window.

Per rank and step: bytes sent / received and seconds waiting on collectives, in total, by
gradient kind (``emb``, ``mlp``) and by kind/collective (``emb/allgather``, ``mlp/alltoall``...,
with their ``calls``), plus ``codec_seconds`` (compressing and decompressing) and the
gradient exchange's ``exchange_seconds`` (its span: first collective started, in backward
when it overlaps, else the end of backward, to last result decoded) and ``waited_seconds``
(the part of the step it took on the training thread: encoding in backward's hooks plus
everything from the end of backward to the last decode, the finite-flags agreement
included); see ``traffic.py``.  waited / exchange is the share of the exchange that overlap did not hide.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .collectives import Collectives
from .distribution import StreamingDistribution

FIELDS = ("sent", "received", "seconds")
# summary.json's *_per_step fields (this rank) and the per-step figures they come from
TOTALS = {"comm_bytes_sent": "sent", "comm_bytes_received": "received", "comm_seconds": "seconds",
          "exchange_seconds": "exchange_seconds", "waited_seconds": "waited_seconds"}
GATHER_EVERY = 1000  # steps a rank buffers at most before they go to rank 0


def flatten(traffic: dict[str, Any]) -> dict[str, float]:
    """A rank's figures of one step from ``TrafficMeter.take()``, as ``{"sent": .., "emb.sent": ..,
    "emb/allgather.calls": .., ...}`` (totals, then per kind, then per kind/collective)."""
    out = {"sent": traffic["comm_bytes_sent"], "received": traffic["comm_bytes_received"],
           "seconds": traffic["comm_seconds"], "codec_seconds": traffic.get("codec_seconds", 0.0),
           "exchange_seconds": traffic.get("exchange_seconds", 0.0),
           "waited_seconds": traffic.get("waited_seconds", 0.0)}
    for key, v in traffic["comm_breakdown"].items():
        kind = key.split("/", 1)[0]
        for f in FIELDS:
            out[f"{kind}.{f}"] = out.get(f"{kind}.{f}", 0) + v[f]
            out[f"{key}.{f}"] = v[f]
        out[f"{key}.calls"] = v["calls"]
    return out


def nest(flat: dict[str, float]) -> dict[str, Any]:
    """``flatten``'s keys back into a comm line's rank record: sent, received, seconds,
    codec_seconds, by_kind {kind: {sent, received, seconds}}, by_collective {kind/collective:
    {sent, received, seconds, calls}}."""
    rec: dict[str, Any] = {"by_kind": {}, "by_collective": {}}
    for key, value in flat.items():
        value = round(value, 6) if key.endswith("seconds") else _bytes(value)
        if "." not in key:
            rec[key] = value
            continue
        group, field = key.rsplit(".", 1)
        rec["by_collective" if "/" in group else "by_kind"].setdefault(group, {})[field] = value
    return rec


def _bytes(value: float) -> float | int:
    """A mean byte (or call) count: an int when it is whole (always so for one-step windows)."""
    value = round(float(value), 3)
    return int(value) if value.is_integer() else value


def _columns(steps: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """Per-step records -> key: float64 [steps] (0 where a step lacks the key)."""
    keys = sorted(set().union(*steps)) if steps else []
    return {k: np.array([s.get(k, 0.0) for s in steps], dtype=np.float64) for k in keys}


def _is_stat(key: str) -> bool:
    """Figures summarised per step in summary.json (call counts only reach the comm lines)."""
    return not key.endswith(".calls")


@dataclass(frozen=True)
class CommWindow:
    """One logging window on rank 0: ``ranks[r]`` is rank r's comm-line record (means per
    step); ``attached[r]`` is what rank r passed to ``flush`` (e.g. its loss sum)."""

    first_step: int
    step: int
    steps: int
    ranks: list[dict[str, Any]]
    attached: list[Any]


class CommOverheadLog:
    """Collects every rank's per-step communication figures on rank 0 (see the module doc).

    ``record_step`` is local; ``maybe_gather`` and ``flush`` are collective: every rank must
    call them at the same steps (the step count is the same everywhere, so the loop calls
    ``maybe_gather`` after every step and ``flush`` at the end of each window).
    """

    def __init__(self, backend: Collectives, gather_every: int = GATHER_EVERY) -> None:
        if gather_every < 1:
            raise ValueError(f"gather_every must be >= 1, got {gather_every}")
        self.backend = backend
        self.gather_every = gather_every
        self._buffer: list[dict[str, float]] = []  # this rank's steps since the last gather
        self._window: list[int] = []  # [first step, last step] of the open window, [] if none
        self._own = {k: StreamingDistribution() for k in TOTALS}  # this rank, every step
        # rank 0 only: window sums, per-rank and busiest-rank distributions per step
        self._window_sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._per_rank: dict[int, dict[str, StreamingDistribution]] = defaultdict(
            lambda: defaultdict(StreamingDistribution))
        self._worst: dict[str, StreamingDistribution] = defaultdict(StreamingDistribution)

    def record_step(self, step: int) -> dict[str, Any]:
        """Take ``step``'s traffic from ``backend.traffic`` (``TrafficMeter.take()``) and keep
        this rank's figures; returns the traffic (comm_bytes_sent, comm_seconds, ...)."""
        traffic = self.backend.traffic.take()
        self._buffer.append(flatten(traffic))
        self._window = [self._window[0] if self._window else step, step]
        return traffic

    def maybe_gather(self) -> None:
        """Collective: bring the buffered steps to rank 0 once ``gather_every`` have piled up."""
        if len(self._buffer) >= self.gather_every:
            self._gather(None)

    def flush(self, write: Callable[[dict[str, Any]], None] | None, attach: Any = None) -> CommWindow | None:
        """Collective: close the window.  Rank 0 passes its comm line to ``write`` (when the
        window has steps) and returns the window with every rank's ``attach``; None elsewhere."""
        attached = self._gather(attach)
        window, self._window = self._window, []
        if self.backend.rank != 0:
            return None
        sums, self._window_sums = self._window_sums, defaultdict(lambda: defaultdict(float))
        if not window:
            return CommWindow(0, 0, 0, [], attached)
        first, last = window
        steps = last - first + 1
        ranks = [{"rank": r, **nest({k: v / steps for k, v in sums[r].items()})}
                 for r in range(self.backend.size)]
        if write:
            write({"event": "comm", "step": last, "first_step": first, "steps": steps, "ranks": ranks})
        return CommWindow(first, last, steps, ranks, attached)

    def _gather(self, attach: Any) -> list[Any]:
        buffered, self._buffer = self._buffer, []
        columns = _columns(buffered)
        for total, key in TOTALS.items():
            self._own[total].add(columns.get(key, []))
        payload = (columns, attach)
        per_rank = self.backend.allgather_object(payload, name="comm_overhead") if self.backend.size > 1 else [payload]
        if self.backend.rank == 0:
            self._fold([cols for cols, _ in per_rank])
        return [a for _, a in per_rank]

    def _fold(self, per_rank: list[dict[str, np.ndarray]]) -> None:
        """Rank 0: add every rank's buffered steps to the window sums and distributions."""
        keys = sorted(set().union(*per_rank))
        for r, columns in enumerate(per_rank):
            for k, values in columns.items():
                self._window_sums[r][k] += float(values.sum())
                if _is_stat(k):
                    self._per_rank[r][k].add(values)
        n = max((len(v) for cols in per_rank for v in cols.values()), default=0)
        for k in filter(_is_stat, keys):
            stacked = np.stack([cols.get(k, np.zeros(n)) for cols in per_rank])
            self._worst[k].add(stacked.max(axis=0))

    def summary(self) -> dict[str, Any]:
        """Rank 0: mean/p50/p95 per step of every figure, per rank and for the busiest rank each step."""
        per_rank = {str(r): {k: d.summary() for k, d in sorted(figures.items())}
                    for r, figures in sorted(self._per_rank.items())}
        return {"per_rank": per_rank,
                "max_over_ranks": {k: d.summary() for k, d in sorted(self._worst.items())},
                "definitions": "bytes and seconds per step and rank; sent: tensors this rank handed to "
                               "Horovod; received: output bytes from other ranks; seconds: waiting on "
                               "collectives (enqueue + blocked); codec_seconds: compress + decompress; "
                               "exchange_seconds: first collective started (else the end of backward) to last "
                               "result decoded; waited_seconds: the step's time on the exchange (encoding "
                               "in backward + end of backward to last decode, the finite check's agreement "
                               "included); mean exact, p50/p95 within 0.5 %"}

    def summary_fields(self) -> dict[str, Any]:
        """summary.json's communication fields: this rank's bytes and seconds per step
        (mean/p50/p95) and, on rank 0, every rank's (``summary()``; None elsewhere).
        Covers the steps gathered so far: call after the last ``flush``."""
        return {**{f"{k}_per_step": d.summary() for k, d in self._own.items()},
                "comm_per_rank": self.summary() if self.backend.rank == 0 else None}
