"""Per-step communication accounting: bytes handed to and returned by collectives, and
seconds spent waiting on them, split by gradient kind ("emb", "mlp", ...) and collective.

Definitions (per rank, per step):
  sent      bytes of the tensors this rank handed to the collective
  received  bytes of the collective's output that came from other ranks
            (allreduce: the whole reduced tensor; allgather: every other rank's part;
            alltoall: the chunks other ranks addressed to this rank)
  seconds   wall time of the blocking call
  codec     seconds compressing and decompressing (reported apart as ``codec_seconds``)
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class TrafficMeter:
    """Accumulates traffic until ``take()`` returns it and starts afresh (once per step)."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    codec: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def record(self, kind: str, collective: str, sent: int, received: int, seconds: float) -> None:
        key = f"{kind}/{collective}"
        self.sent[key] += int(sent)
        self.received[key] += int(received)
        self.seconds[key] += float(seconds)
        self.calls[key] += 1

    def record_codec(self, kind: str, seconds: float) -> None:
        """Seconds spent compressing / decompressing (compute, not waiting on the network)."""
        self.codec[kind] += float(seconds)

    def take(self) -> dict[str, object]:
        """Totals and the per-(kind/collective) breakdown since the last call; then reset."""
        out = {
            "comm_bytes_sent": sum(self.sent.values()),
            "comm_bytes_received": sum(self.received.values()),
            "comm_seconds": sum(self.seconds.values()),
            "codec_seconds": round(sum(self.codec.values()), 6),
            "comm_breakdown": {
                k: {"sent": self.sent[k], "received": self.received[k],
                    "seconds": round(self.seconds[k], 6), "calls": self.calls[k]}
                for k in sorted(self.sent)
            },
        }
        self.sent.clear()
        self.received.clear()
        self.seconds.clear()
        self.calls.clear()
        self.codec.clear()
        return out
