"""Step-time model of data-parallel DQRM training: pure formulas over measured parts.

One training step of one rank = compute(local batch) + gradient exchange (the exchange
after backward, as ``--no-overlap`` runs it and as ``--overlap`` does on hosts without a core
to spare for Horovod's thread).  The exchange is what ``comm/sync.py`` does:

- MLP gradients (V values, G per-channel scale groups):
  FP32 (``none``): one ring allreduce of 4V bytes (each rank's link carries 2(N-1)/N of it).
  INT8/INT4, allgather: one allgather of the packed payload p = ceil(V bits / 8) + 4G;
  each rank's link carries (N-1) p (ring), every rank decodes N payloads.
  INT8/INT4, two-phase: an alltoall of the payload's N chunks ((N-1)/N p leaves each rank),
  the chunk owner decodes N chunks, averages, re-encodes; an allgather of the reduced
  chunks ((N-1) p/N).
- Embedding gradients (U unique rows per rank, dim d, T tables, 4-byte ids): one message
  m(U) = 8 + 4U + ceil(U d bits / 8) + [4T scales when quantized].
  allgather: two Horovod calls started together (the byte counts and the messages: one
  call's fixed cost and latency); (N-1) m(U) per link.
  two-phase: the id space split into N ranges; an alltoall of one message per range, the
  owner merges the rows of its range (R = U_global / N unique rows, U_global the distinct
  rows of the whole global batch) and re-encodes them, an allgather of m(R).

A collective costs: a fixed per-call time (Horovod negotiation and MPI set-up, measured),
the bytes leaving the rank over its link / the link's payload rate, and one link latency
per algorithm step (ring: N-1 steps for allgather and alltoall, 2(N-1) for allreduce).
Codec time = per-value encode and decode costs (error feedback included) + a cost per
decoded message + a fixed cost per exchange, all measured.  Load imbalance between the
two-phase id ranges is ignored (ranges split the id space evenly, not the traffic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

BITS = {"none": 32, "int8": 8, "int4": 4}
#: exchange schemes predicted: name -> the compressor of both embedding and MLP gradients
SCHEMES = {"fp32_sparse": "none", "int8": "int8", "int4": "int4"}
COLLECTIVES = ("allgather", "two-phase")
HEADER = 8  # SparseExchange.HEADER: the row count of a message


@dataclass(frozen=True)
class Dims:
    """What is exchanged: MLP values and per-channel scale groups; embedding dim and tables."""

    mlp_values: int
    mlp_groups: int
    emb_dim: int
    emb_tables: int
    id_bytes: int = 4


@dataclass(frozen=True)
class Link:
    """A rank's network link: nominal rate, achieved share of it for payload, one-way latency."""

    gbit: float
    efficiency: float = 1.0
    latency_s: float = 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.gbit * 1e9 / 8 * self.efficiency


@dataclass(frozen=True)
class CallCost:
    """Fixed seconds per Horovod collective call, by collective."""

    allreduce: float
    allgather: float
    alltoall: float


@dataclass(frozen=True)
class CodecCost:
    """Seconds per value encoded (error feedback included), per value decoded (and added),
    per message decoded, and per exchange call."""

    encode: float
    decode: float
    message: float = 0.0
    fixed: float = 0.0


@dataclass(frozen=True)
class Transfer:
    """One Horovod collective call as one rank sees it.

    link_bytes: bytes leaving the rank over its link (the algorithm's, see the module doc).
    sent_bytes: bytes the rank hands to the collective (what the per-step log counts as sent).
    steps: latency steps of the algorithm.
    alongside: started together with the plan's next call (backend.allgather's byte counts,
      started with the payload): no fixed cost or latency of its own.
    """

    collective: str
    link_bytes: float
    sent_bytes: float
    steps: int
    alongside: bool = False


@dataclass(frozen=True)
class CodecWork:
    """Values encoded and decoded, and messages decoded, by one rank in one exchange."""

    encoded: float = 0.0
    decoded: float = 0.0
    messages: float = 0.0


@dataclass(frozen=True)
class Plan:
    transfers: tuple[Transfer, ...]
    work: CodecWork

    @property
    def sent_bytes(self) -> float:
        return sum(t.sent_bytes for t in self.transfers)

    @property
    def link_bytes(self) -> float:
        return sum(t.link_bytes for t in self.transfers)


# -- bytes -------------------------------------------------------------------------------
def data_bytes(values: float, bits: int) -> float:
    return math.ceil(values * bits / 8)


def mlp_payload_bytes(dims: Dims, codec: str) -> float:
    """Bytes of one rank's MLP payload (quantized: data + one FP32 scale per group)."""
    bits = BITS[codec]
    return data_bytes(dims.mlp_values, bits) + (0 if bits == 32 else 4 * dims.mlp_groups)


def emb_message_bytes(rows: float, dims: Dims, codec: str) -> float:
    """Bytes of one embedding message of ``rows`` rows (header, ids, values, table scales)."""
    bits = BITS[codec]
    return (HEADER + rows * dims.id_bytes + data_bytes(rows * dims.emb_dim, bits)
            + (0 if bits == 32 else 4 * dims.emb_tables))


# -- plans ---------------------------------------------------------------------------------
def mlp_plan(codec: str, n: int, dims: Dims, two_phase: bool) -> Plan:
    """The MLP exchange of one rank among ``n``."""
    v = dims.mlp_values
    p = mlp_payload_bytes(dims, codec)
    if codec == "none":  # linear: one grouped allreduce whatever the collective setting
        return Plan((Transfer("allreduce", 2 * (n - 1) / n * p, p, 2 * (n - 1)),), CodecWork(v, v, 1))
    if not two_phase:
        return Plan((Transfer("allgather", (n - 1) * p, p, n - 1),), CodecWork(v, n * v, n))
    chunk = p / n
    return Plan((Transfer("alltoall", (n - 1) * chunk, (n - 1) * chunk, n - 1),
                 Transfer("allgather", 0.0, 8, n - 1, alongside=True),  # the chunks' byte counts
                 Transfer("allgather", (n - 1) * chunk, chunk, n - 1)),
                CodecWork(v + v / n, 2 * v, 2 * n))


def emb_plan(codec: str, n: int, rows_local: float, rows_global: float, dims: Dims, two_phase: bool) -> Plan:
    """The sparse embedding exchange of one rank among ``n``: ``rows_local`` unique rows in
    its batch, ``rows_global`` unique rows in the global batch."""
    d = dims.emb_dim
    counts = Transfer("allgather", 0.0, 8, n - 1, alongside=True)  # backend.allgather's per-rank byte counts
    if not two_phase:
        m = emb_message_bytes(rows_local, dims, codec)
        return Plan((counts, Transfer("allgather", (n - 1) * m, m, n - 1)),
                    CodecWork(rows_local * d, n * rows_local * d, n))
    out = sum(emb_message_bytes(rows_local / n, dims, codec) for _ in range(n))  # one message per id range
    owned = rows_global / n
    reduced = emb_message_bytes(owned, dims, codec)
    return Plan((Transfer("alltoall", (n - 1) / n * out, (n - 1) / n * out, n - 1),
                 counts, Transfer("allgather", (n - 1) * reduced, reduced, n - 1)),
                CodecWork((rows_local + owned) * d, (rows_local + rows_global) * d, 2 * n))


# -- seconds --------------------------------------------------------------------------------
def transfer_seconds(t: Transfer, link: Link, calls: CallCost) -> float:
    if t.alongside:
        return t.link_bytes / link.bytes_per_s
    return getattr(calls, t.collective) + t.link_bytes / link.bytes_per_s + t.steps * link.latency_s


def codec_seconds(work: CodecWork, cost: CodecCost) -> float:
    return cost.fixed + work.encoded * cost.encode + work.decoded * cost.decode + work.messages * cost.message


def exchange_seconds(plan: Plan, link: Link, calls: CallCost, codec: CodecCost, cpu_slowdown: float = 1.0) -> dict:
    """{'network': s, 'codec': s, 'total': s} of one exchange; ``cpu_slowdown`` stretches the
    codec (ranks sharing cores, as on the emulated cluster)."""
    net = sum(transfer_seconds(t, link, calls) for t in plan.transfers)
    cod = codec_seconds(plan.work, codec) * cpu_slowdown
    return {"network": net, "codec": cod, "total": net + cod}


def compute_seconds(batch: float, fixed_s: float, per_sample_s: float) -> float:
    """Forward + backward + optimizer of one rank's batch."""
    return fixed_s + per_sample_s * batch


# -- unique rows ----------------------------------------------------------------------------
def interpolate_rows(batches: list[float], rows: list[float], batch: float) -> float:
    """Unique rows at ``batch`` from rows measured at ascending ``batches``: piecewise linear
    in log-log, extended with the end segments' slopes (at most 1: rows never grow faster
    than the batch)."""
    if len(batches) != len(rows) or len(batches) < 2:
        raise ValueError("need unique rows measured at two or more batch sizes")
    lx, ly = [math.log(b) for b in batches], [math.log(r) for r in rows]
    x = math.log(batch)
    i = 0 if x <= lx[0] else len(lx) - 2 if x >= lx[-1] else max(j for j in range(len(lx) - 1) if lx[j] <= x)
    slope = (ly[i + 1] - ly[i]) / (lx[i + 1] - lx[i])
    if lx[0] <= x <= lx[-1]:
        return math.exp(ly[i] + slope * (x - lx[i]))
    at = 0 if x < lx[0] else -1  # outside: from the nearest measured point
    return math.exp(ly[at] + min(1.0, slope) * (x - lx[at]))


def better_collective(times: dict[str, float]) -> str:
    """The faster of allgather and two-phase (allgather on a tie: fewer calls, no re-quantization)."""
    return "two-phase" if times["two-phase"] < times["allgather"] else "allgather"


def switch_point(faster: dict[int, str]) -> int | None:
    """The smallest rank count from which two-phase is faster at every larger rank count
    in ``faster`` (ranks -> the faster collective), or None if it never stays ahead."""
    ranks = sorted(faster)
    for i, n in enumerate(ranks):
        if all(faster[m] == "two-phase" for m in ranks[i:]):
            return n
    return None


def best_threshold(times: dict[tuple, dict[str, float]], ranks: list[int]) -> int:
    """The ``two_phase_min_ranks`` of ``--collective auto`` (allgather below it, two-phase
    from it) that loses least against always picking the faster collective: the smallest k
    minimising the summed relative slowdown t(auto) / min(t) - 1 over every case.

    times: (case, ranks) -> {"allgather": s, "two-phase": s}, for each case (a scheme at a
    link speed) at each of ``ranks``.  k ranges over ``ranks`` and max(ranks) + 1 (never)."""
    cases = {c for c, _ in times}

    def loss(k: int) -> float:
        total = 0.0
        for c in cases:
            for n in ranks:
                t = times[(c, n)]
                total += t["two-phase" if n >= k else "allgather"] / min(t.values()) - 1
        return total

    candidates = sorted(ranks) + [max(ranks) + 1]
    return min(candidates, key=lambda k: (loss(k), k))
