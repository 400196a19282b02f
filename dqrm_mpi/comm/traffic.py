"""Per-step communication accounting: bytes handed to and returned by collectives, and
seconds spent waiting on them, split by gradient kind ("emb", "mlp", ...) and collective.

Definitions (per rank, per step):
  sent      bytes of the tensors this rank handed to the collective
  received  bytes of the collective's output that came from other ranks
            (allreduce: the whole reduced tensor; allgather: every other rank's part;
            alltoall: the chunks other ranks addressed to this rank)
  seconds   time the calling thread spent on the call: enqueueing it plus blocking until it
            was done (a collective started in backward and waited for later counts only the
            part the step actually waited for)
  codec     seconds compressing and decompressing (reported apart as ``codec_seconds``)
  exchange_seconds  the gradient exchange's span: from the start of its first collective (in
            backward when it overlaps, else the end of backward) to its last result decoded
            (``synchronize()`` done)
  waited_seconds    the part of the step the exchange took on the training thread: encoding
            inside backward's hooks plus everything from the end of backward to the last
            decode: the finite-flags agreement (its collective queues behind the exchange's in
            flight), starting what backward did not, blocked waiting, decoding; without overlap
            both are the time from the end of backward to the last decode
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
    exchange_seconds: float = 0.0
    waited_seconds: float = 0.0

    def record(self, kind: str, collective: str, sent: int, received: int, seconds: float, calls: int = 1) -> None:
        """Add to ``kind/collective``; a started collective is recorded twice: at its start
        (sent, enqueue seconds, the call) and when waited for (received, blocked seconds, calls=0)."""
        key = f"{kind}/{collective}"
        self.sent[key] += int(sent)
        self.received[key] += int(received)
        self.seconds[key] += float(seconds)
        self.calls[key] += calls

    def record_codec(self, kind: str, seconds: float) -> None:
        """Seconds spent compressing / decompressing (compute, not waiting on the network)."""
        self.codec[kind] += float(seconds)

    def record_exchange(self, exchange_seconds: float, waited_seconds: float) -> None:
        """One gradient exchange's span and the part of it the step waited for (see the module doc)."""
        self.exchange_seconds += float(exchange_seconds)
        self.waited_seconds += float(waited_seconds)

    def take(self) -> dict[str, object]:
        """Totals and the per-(kind/collective) breakdown since the last call; then reset."""
        out = {
            "comm_bytes_sent": sum(self.sent.values()),
            "comm_bytes_received": sum(self.received.values()),
            "comm_seconds": sum(self.seconds.values()),
            "codec_seconds": round(sum(self.codec.values()), 6),
            "exchange_seconds": round(self.exchange_seconds, 6),
            "waited_seconds": round(self.waited_seconds, 6),
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
        self.exchange_seconds = self.waited_seconds = 0.0
        return out
