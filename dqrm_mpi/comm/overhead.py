"""Per-iteration communication overhead of every rank: the one source of the run's
communication figures (metrics.jsonl's step and comm lines, summary.json's comm fields).

After every step, ``record_step`` takes the step's traffic from the backend's meter (which
starts afresh).  Each rank keeps its own per-step figures in memory; every
``flush_every`` steps and at the end of the run one ``allgather_object`` (not counted as
step traffic) brings them to rank 0, which writes one ``{"event": "comm", "step": s,
"ranks": [...]}`` line per step to metrics.jsonl and keeps the numbers for the summary.
So the per-step cost is a list append; the gather happens once per ``flush_every`` steps.

Per rank and step: bytes sent / received and seconds waiting on collectives, in total, by
gradient kind (``emb``, ``mlp``) and by kind/collective (``emb/allgather``, ``mlp/alltoall``...),
plus ``codec_seconds`` (compressing and decompressing).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import numpy as np

from .collectives import Collectives

FIELDS = ("sent", "received", "seconds")
TOTALS = ("comm_bytes_sent", "comm_bytes_received", "comm_seconds")  # per step, in summary.json as *_per_step


def compact(traffic: dict[str, Any]) -> dict[str, Any]:
    """A rank's step record from ``TrafficMeter.take()``."""
    rec: dict[str, Any] = {"sent": traffic["comm_bytes_sent"], "received": traffic["comm_bytes_received"],
                           "seconds": round(traffic["comm_seconds"], 6),
                           "codec_seconds": traffic.get("codec_seconds", 0.0)}
    kinds: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
    for key, v in traffic["comm_breakdown"].items():
        kind = key.split("/", 1)[0]
        for f in FIELDS:
            kinds[kind][f] += v[f]
    rec["by_kind"] = {k: {f: (round(v[f], 6) if f == "seconds" else v[f]) for f in FIELDS} for k, v in kinds.items()}
    rec["by_collective"] = {k: {f: v[f] for f in (*FIELDS, "calls")} for k, v in traffic["comm_breakdown"].items()}
    return rec


def _flatten(rec: dict[str, Any]) -> dict[str, float]:
    out = {f: rec[f] for f in (*FIELDS, "codec_seconds")}
    for group in ("by_kind", "by_collective"):
        for key, v in rec[group].items():
            for f in FIELDS:
                out[f"{key}.{f}"] = v[f]
    return out


def dist(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95))}


class CommOverheadLog:
    """Collects every rank's per-step communication figures on rank 0 (see the module doc).

    ``record_step`` is local; ``maybe_flush`` / ``flush`` are collective: every rank must
    call them at the same steps (the step count is the same everywhere, so the loop calls
    them after every step and once at the end).
    """

    def __init__(self, backend: Collectives, flush_every: int = 100) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.backend = backend
        self.flush_every = flush_every
        self._pending: list[tuple[int, dict[str, Any]]] = []
        # rank 0: metric -> rank -> values over steps
        self._values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        self._worst: dict[str, list[float]] = defaultdict(list)
        self._totals: dict[str, list[float]] = {k: [] for k in TOTALS}  # this rank, every step

    def record_step(self, step: int) -> dict[str, Any]:
        """Take ``step``'s traffic from ``backend.traffic`` (``TrafficMeter.take()``) and keep
        this rank's figures; returns it (the comm fields of metrics.jsonl's step line)."""
        traffic = self.backend.traffic.take()
        for k in TOTALS:
            self._totals[k].append(traffic[k])
        self._pending.append((step, compact(traffic)))
        return traffic

    def maybe_flush(self, step: int, write: Callable[[dict[str, Any]], None] | None) -> None:
        if step % self.flush_every == 0:
            self.flush(write)

    def flush(self, write: Callable[[dict[str, Any]], None] | None) -> None:
        """Collective: gather pending records to rank 0, which passes one record per step to ``write``."""
        pending, self._pending = self._pending, []
        per_rank = (self.backend.allgather_object(pending, name="comm_overhead") if self.backend.size > 1
                    else [pending])
        if self.backend.rank != 0:
            return
        for i, (step, _) in enumerate(per_rank[0]):
            ranks = [{"rank": r, **recs[i][1]} for r, recs in enumerate(per_rank)]
            flat = [_flatten(x) for x in ranks]
            for r, f in enumerate(flat):
                for k, v in f.items():
                    self._values[k][r].append(v)
            for k in set().union(*flat):
                self._worst[k].append(max(f.get(k, 0) for f in flat))
            if write:
                write({"event": "comm", "step": step, "ranks": ranks})

    def summary(self) -> dict[str, Any]:
        """Rank 0: mean/p50/p95 per step of every figure, per rank and for the busiest rank each step."""
        per_rank: dict[str, dict[str, Any]] = defaultdict(dict)
        for metric, ranks in sorted(self._values.items()):
            for r, values in ranks.items():
                per_rank[str(r)][metric] = dist(values)
        return {"per_rank": dict(per_rank),
                "max_over_ranks": {k: dist(v) for k, v in sorted(self._worst.items())},
                "definitions": "bytes and seconds per step and rank; sent: tensors this rank handed to "
                               "Horovod; received: output bytes from other ranks; seconds: waiting on "
                               "collectives; codec_seconds: compress + decompress"}

    def summary_fields(self) -> dict[str, Any]:
        """summary.json's communication fields: this rank's bytes and seconds per step
        (mean/p50/p95) and, on rank 0, every rank's (``summary()``; None elsewhere)."""
        return {**{f"{k}_per_step": dist(v) for k, v in self._totals.items()},
                "comm_per_rank": self.summary() if self.backend.rank == 0 else None}
