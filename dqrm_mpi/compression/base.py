"""The compressor interface and the registry of compressors by name.

A compressor turns a flat float32 vector into what goes on the wire and back:

    compressed = compressor.compress(x, groups, num_groups)   # x: float32 [n]
    x_hat = compressor.decompress(compressed, groups)          # float32 [n]

``groups`` (int64 [n], or None for one group) gives each element's scale group: one group
per tensor, per output channel of an MLP weight, per embedding table or per embedding row.
Linear compressors (``none``, ``fp16``) carry no scales and declare ``allreduce``: their
payloads may be summed.  Quantized compressors declare ``allgather``: their integers are
never summed across ranks; every rank dequantizes every payload (or, two-phase, one chunk
of it) and sums in float.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

ALLREDUCE = "allreduce"
ALLGATHER = "allgather"


@dataclass(frozen=True)
class Compressed:
    """A compressed flat vector.

    data: what is handed to the collective (float32/float16 for linear compressors, uint8
      for quantized ones; INT4 holds two values per byte).
    scales: float32 [num_groups] (empty for linear compressors).
    numel: number of values encoded.
    """

    data: torch.Tensor
    scales: torch.Tensor
    numel: int


class Compressor(ABC):
    """compress / decompress one flat float vector; see the module docstring."""

    name: ClassVar[str]
    #: the payload can be summed by allreduce (only then may the collective be allreduce)
    linear: ClassVar[bool]
    #: the collective this compressor's payloads need
    collective: ClassVar[str]
    #: bits per value on the wire
    bits: ClassVar[int]
    #: decompress(compress(x)) == x exactly
    lossless: ClassVar[bool] = False
    #: payloads are (index, value) pairs of varying size (``sparse.SparseCompressor``)
    sparse: ClassVar[bool] = False

    @abstractmethod
    def compress(self, x: torch.Tensor, groups: torch.Tensor | None = None, num_groups: int = 1) -> Compressed:
        """x float32 [n] -> Compressed; ``groups`` int64 [n] in [0, num_groups) or None (one group)."""

    @abstractmethod
    def decompress(self, c: Compressed, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Compressed -> float32 [numel]."""

    # -- sizes and the byte form used inside packed messages ----------------------
    @property
    def wire_dtype(self) -> torch.dtype:
        return torch.uint8

    def data_nbytes(self, numel: int) -> int:
        return (numel * self.bits + 7) // 8

    def scales_nbytes(self, num_groups: int) -> int:
        return 0 if self.linear else 4 * num_groups

    def nbytes(self, numel: int, num_groups: int = 1) -> int:
        """Analytic payload size: data plus scales."""
        return self.data_nbytes(numel) + self.scales_nbytes(num_groups)

    def to_bytes(self, c: Compressed) -> torch.Tensor:
        """uint8 [nbytes]: data then scales."""
        parts = [as_bytes(c.data)]
        if not self.linear:
            parts.append(as_bytes(c.scales.to(torch.float32)))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def from_bytes(self, buf: torch.Tensor, numel: int, num_groups: int = 1) -> Compressed:
        n = self.data_nbytes(numel)
        data = from_bytes(buf[:n], self.wire_dtype)
        scales = (from_bytes(buf[n:n + self.scales_nbytes(num_groups)], torch.float32) if not self.linear
                  else torch.empty(0))
        return Compressed(data, scales, numel)

    # -- buffer-writing forms used by the exchanges (quantized compressors override them) --
    def encode_into(self, x: torch.Tensor, layout, out: torch.Tensor, transmitted: torch.Tensor | None = None,
                    work: torch.Tensor | None = None) -> None:
        """Write x's wire bytes (data, then scales) into ``out`` uint8 [nbytes]; ``layout``
        (compression.layout.Layout) gives the scale groups.  ``transmitted`` float32 [n], when
        given, receives the values the receivers will decode; ``work`` float32 [n] is scratch."""
        c = self.compress(x)
        out.copy_(self.to_bytes(c))
        if transmitted is not None:
            transmitted.copy_(self.decompress(c))

    def encode_feedback_into(self, x: torch.Tensor, layout, out: torch.Tensor, work: torch.Tensor | None = None) -> None:
        """``encode_into``, then x -= the values the receivers will decode: x float32 [n], the
        compensated vector of error feedback, becomes the residual in place (the numbers of
        ``residual = x - transmitted``, without a transmitted copy where the codec can avoid it)."""
        transmitted = torch.empty_like(x)
        self.encode_into(x, layout, out, transmitted, work)
        x.sub_(transmitted)

    def decode_many(self, bufs: torch.Tensor, layout, out: torch.Tensor) -> torch.Tensor:
        """Payloads uint8 [r, nbytes] (one per rank, one layout) -> out float32 [r, numel]."""
        for i in range(bufs.shape[0]):
            out[i] = self.decompress(self.from_bytes(bufs[i], out.shape[1]))
        return out

    def decode_mean(self, bufs: torch.Tensor, layout, size: int) -> torch.Tensor:
        """Payloads uint8 [r, nbytes] (one per rank, rank order) -> their mean float32 [numel]
        (a new tensor): decoded, summed in rank order and divided by ``size``, the same float
        sum on every rank."""
        deq = self.decode_many(bufs, layout, torch.empty(bufs.shape[0], layout.numel, dtype=torch.float32,
                                                         device=bufs.device))
        total = deq[0] + deq[1] if deq.shape[0] > 1 else deq[0].clone()
        for r in range(2, deq.shape[0]):
            total.add_(deq[r])
        return total.div_(size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as uint8 [nbytes] (a view when possible)."""
    t = t.contiguous().reshape(-1)
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def from_bytes(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [k * itemsize] -> dtype [k] (copied, so alignment never matters)."""
    if dtype == torch.uint8:
        return buf
    return buf.clone().view(dtype)


# -- registry -------------------------------------------------------------------
_REGISTRY: dict[str, type[Compressor]] = {}
_PARAMETRIC: dict[str, Callable[[str], Compressor]] = {}  # "topk" -> factory of "topk:0.01+int8"


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make ``cls`` available by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"compressor {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def register_parametric(prefix: str, factory: Callable[[str], Compressor]) -> None:
    """Make specs ``prefix:...`` (e.g. ``topk:0.01+int8``) build ``factory(spec)``."""
    if prefix in _PARAMETRIC:
        raise ValueError(f"compressor family {prefix!r} registered twice")
    _PARAMETRIC[prefix] = factory


def compressor_names() -> tuple[str, ...]:
    """The plain compressor names (the parametric families take ``FAMILY:...`` specs)."""
    return tuple(_REGISTRY)


def get_compressor(name: str) -> Compressor:
    """The compressor registered as ``name``, or built from a parametric spec such as
    ``topk:0.01+int8``; unknown names and malformed specs raise ValueError saying what is expected."""
    if name in _REGISTRY:
        return _REGISTRY[name]()
    family = name.split(":", 1)[0]
    if ":" in name and family in _PARAMETRIC:
        return _PARAMETRIC[family](name)
    families = "".join(f", {f}:..." for f in _PARAMETRIC)
    raise ValueError(f"unknown compressor {name!r}; choose one of {', '.join(_REGISTRY)}{families}")
