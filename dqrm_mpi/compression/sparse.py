"""Sparsifying compressors for dense (MLP) gradients: top-k and threshold, with error feedback.

    topk:RATIO[+VALUES]        each gradient tensor sends its ceil(RATIO * numel) largest |values|
    threshold:VALUE[+VALUES]   every element with |x| >= VALUE is sent (a variable count per rank)

VALUES (default ``none``: FP32) is the codec of the kept values: ``fp16``, ``int16``, ``int8``
or ``int4``, quantized with one scale per gradient tensor (``qcore``'s symmetric rule through
``quantize``).  What is not sent (and the kept values' quantization error) stays in the
error-feedback residual of the exchange.  Payloads are never summed: they declare allgather,
and every rank adds every rank's kept values into a dense sum, in rank order.

Payload, one uint8 message per rank (little-endian)::

    header  32 bytes: uint8 selector (1 topk, 2 threshold), uint8 values codec, 6 zero bytes,
            float64 parameter (RATIO or VALUE), int64 numel, int64 k (values kept)
    indices int32 [k], ascending, into the flat vector
    values  the VALUES codec's bytes of the k kept values (scales last, one per tensor)

A receiver checks the header against its own compressor and refuses a payload built with
another selector, parameter, codec or vector size.

Top-k selection (``select``): ``exact`` runs ``torch.topk`` over each tensor; ``sample``
(default) estimates the threshold from a random sample as Deep Gradient Compression does
(aiming at about 2k candidates), keeps the candidates above it and runs ``torch.topk`` on
those only, falling back to ``exact`` when the estimate leaves fewer than k; both return
the same set.  Ties at the k-th largest |value| go to the lowest indices, so the set is
deterministic.  ``chunk`` keeps the ceil(RATIO * 4096) largest of each run of 4,096 values
(and ceil(RATIO * rest) of the tail): close to k in all, but not the k largest of the tensor.
"""
from __future__ import annotations

import math
import re

import torch

from .base import ALLGATHER, Compressed, Compressor, as_bytes, from_bytes, get_compressor, register_parametric
from .layout import Layout

SELECTORS = {"topk": 1, "threshold": 2}
VALUE_CODECS = ("none", "fp16", "int16", "int8", "int4")
SELECT_METHODS = ("sample", "exact", "chunk")
HEADER = 32
CHUNK = 4096
SPEC_FORM = ("topk:RATIO[+VALUES] (0 < RATIO <= 1, e.g. topk:0.01+int8) or threshold:VALUE[+VALUES] "
             f"(VALUE > 0, e.g. threshold:1e-4); VALUES one of {', '.join(VALUE_CODECS)}")
_SPEC = re.compile(r"^(topk|threshold):([^+]+)(?:\+(\w+))?$")


def is_sparse_spec(spec: str) -> bool:
    return spec.split(":", 1)[0] in SELECTORS


def parse_spec(spec: str) -> tuple[str, float, str]:
    """'topk:0.01+int8' -> ('topk', 0.01, 'int8'); ValueError giving the expected form."""
    m = _SPEC.match(spec.strip())
    try:
        param = float(m.group(2)) if m else math.nan
    except ValueError:
        param = math.nan
    values = (m.group(3) or "none") if m else ""
    ok = m is not None and math.isfinite(param) and values in VALUE_CODECS and param > 0 and \
        (m.group(1) != "topk" or param <= 1)
    if not ok:
        raise ValueError(f"expected {SPEC_FORM}; got {spec!r}")
    return m.group(1), param, values


def select_topk(a: torch.Tensor, k: int, method: str = "sample",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices int64 [k] (ascending) of the k largest values of a float32 [n] (|gradient|).

    Ties at the k-th largest value are broken towards the lowest indices.  ``method``:
    exact or sample (the same set), chunk (per-chunk top-k, about k indices); see the module doc.
    """
    n = a.numel()
    if k >= n:
        return torch.arange(n)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    if method == "chunk":
        return _chunk_topk(a, k)
    cand = None
    if method == "sample":
        size = min(n, max(1024, math.ceil(32 * n / k)))  # ~64 sampled values above the estimate
        if size < n // 2:
            sample = a[torch.randint(n, (size,), generator=generator)]
            estimate = torch.topk(sample, math.ceil(2 * k * size / n), sorted=False).values.min()
            cand = torch.nonzero(a >= estimate).squeeze(1)
            if cand.numel() < k:
                cand = None  # the estimate overshot: exact selection
    elif method != "exact":
        raise ValueError(f"select must be one of {SELECT_METHODS}, got {method!r}")
    values = a if cand is None else a[cand]
    kth = torch.topk(values, k, sorted=False).values.min()
    above = torch.nonzero(values > kth).squeeze(1)
    at = torch.nonzero(values == kth).squeeze(1)[:k - above.numel()]  # lowest indices first
    picked = torch.cat([above, at]).sort().values
    return picked if cand is None else cand[picked]


def _chunk_topk(a: torch.Tensor, k: int) -> torch.Tensor:
    n = a.numel()
    full, tail = divmod(n, CHUNK)
    parts = []
    if full:
        kc = math.ceil(k * CHUNK / n)
        idx = torch.topk(a[:full * CHUNK].view(full, CHUNK), kc, dim=1, sorted=False).indices
        parts.append((idx + torch.arange(full).unsqueeze(1) * CHUNK).reshape(-1))
    if tail:
        parts.append(torch.topk(a[full * CHUNK:], math.ceil(k * tail / n), sorted=False).indices + full * CHUNK)
    return torch.cat(parts).sort().values


class SparseCompressor(Compressor):
    """top-k or threshold sparsification of a flat vector whose scale groups (``Layout``) are
    its tensors; see the module doc.  ``spec`` as on the command line, e.g. ``topk:0.01+int8``."""

    linear = False
    collective = ALLGATHER
    sparse = True  # variable-size payloads of (index, value): DenseExchange's sparse path

    def __init__(self, spec: str, select: str = "sample", seed: int = 0) -> None:
        if select not in SELECT_METHODS:
            raise ValueError(f"select must be one of {SELECT_METHODS}, got {select!r}")
        self.selector, self.param, values = parse_spec(spec)
        self.name = spec
        self.values = get_compressor(values)
        self.bits = self.values.bits
        self.select = select
        self._generator = torch.Generator().manual_seed(seed)  # the sampling (not the result)

    def __repr__(self) -> str:
        return f"SparseCompressor({self.name!r}, select={self.select!r})"

    # -- sizes -------------------------------------------------------------------
    def kept(self, layout: Layout) -> int | None:
        """Values a top-k payload keeps for this layout (exact/sample selection); None for threshold."""
        if self.selector != "topk" or self.select == "chunk":
            return None
        return sum(min(n, math.ceil(self.param * n)) for _, n in _segments(layout))

    def message_nbytes(self, k: int, num_groups: int) -> int:
        return HEADER + 4 * k + self.values.nbytes(k, num_groups)

    def nbytes(self, numel: int, num_groups: int = 1) -> int:
        """Upper bound (every value kept); the top-k size is ``message_nbytes(kept(layout), groups)``."""
        return self.message_nbytes(numel, num_groups)

    # -- the exchange's form ---------------------------------------------------------
    def encode(self, x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """x float32 [n] -> (message uint8, the dense float32 [n] the receivers will decode)."""
        idx = self._indices(x, layout)
        k, groups = idx.numel(), layout.num_groups
        kept_layout = Layout.from_sizes(_counts(idx, layout))
        msg = torch.empty(self.message_nbytes(k, groups), dtype=torch.uint8)
        msg[:HEADER].copy_(self._header(layout.numel, k))
        msg[HEADER:HEADER + 4 * k].copy_(as_bytes(idx.to(torch.int32)))
        sent = torch.empty(k, dtype=torch.float32)
        self.values.encode_into(x[idx], kept_layout, msg[HEADER + 4 * k:], sent)
        transmitted = torch.zeros_like(x)
        transmitted[idx] = sent
        return msg, transmitted

    def decode_add(self, msg: torch.Tensor, layout: Layout, out: torch.Tensor, source: str = "a rank") -> None:
        """Add the values of ``msg`` into out float32 [n]; ValueError for a payload that another
        compressor (selector, parameter, codec) or another vector size built."""
        k = self._check_header(msg, layout, source)
        idx = from_bytes(msg[HEADER:HEADER + 4 * k], torch.int32).to(torch.int64)
        vals = torch.empty(1, k, dtype=torch.float32)
        if k:
            self.values.decode_many(msg[HEADER + 4 * k:].view(1, -1), Layout.from_sizes(_counts(idx, layout)), vals)
        out.index_add_(0, idx, vals.view(-1))

    # -- Compressor interface ----------------------------------------------------------
    def compress(self, x, groups=None, num_groups=1):
        msg, _ = self.encode(x.to(torch.float32), _layout(groups, num_groups, x.numel()))
        return Compressed(msg, torch.empty(0), x.numel())

    def decompress(self, c, groups=None):
        num_groups = int(groups.max()) + 1 if groups is not None and groups.numel() else 1
        layout = _layout(groups, num_groups, c.numel)
        out = torch.zeros(c.numel, dtype=torch.float32)
        self.decode_add(c.data, layout, out)
        return out

    def to_bytes(self, c):
        return c.data

    def from_bytes(self, buf, numel, num_groups=1):
        return Compressed(buf, torch.empty(0), numel)

    def encode_into(self, x, layout, out, transmitted=None, work=None):
        raise TypeError(f"{self.name}: variable-size payload; use encode()")

    def decode_many(self, bufs, layout, out):
        raise TypeError(f"{self.name}: variable-size payload; use decode_add()")

    # -- internals -----------------------------------------------------------------------
    def _indices(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        a = x.abs()
        if self.selector == "threshold":
            return torch.nonzero(a >= self.param).squeeze(1)
        parts = [select_topk(a[lo:lo + n], math.ceil(self.param * n), self.select, self._generator) + lo
                 for lo, n in _segments(layout) if n]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def _header(self, numel: int, k: int) -> torch.Tensor:
        head = torch.zeros(HEADER, dtype=torch.uint8)
        head[0], head[1] = SELECTORS[self.selector], VALUE_CODECS.index(self.values.name)
        head[8:16].copy_(as_bytes(torch.tensor([self.param], dtype=torch.float64)))
        head[16:32].copy_(as_bytes(torch.tensor([numel, k], dtype=torch.int64)))
        return head

    def _check_header(self, msg: torch.Tensor, layout: Layout, source: str) -> int:
        if msg.numel() < HEADER:
            raise ValueError(f"{self.name}: {source} sent a {msg.numel()}-byte payload, shorter than its header")
        selector = {v: s for s, v in SELECTORS.items()}.get(int(msg[0]), f"selector {int(msg[0])}")
        codec = VALUE_CODECS[int(msg[1])] if int(msg[1]) < len(VALUE_CODECS) else f"codec {int(msg[1])}"
        param = float(from_bytes(msg[8:16], torch.float64)[0])
        their_numel, k = from_bytes(msg[16:32], torch.int64).tolist()
        theirs = f"{selector}:{param:g}+{codec}"
        if (selector, param, codec) != (self.selector, self.param, self.values.name):
            raise ValueError(f"{source} sent a {theirs} payload, this rank runs {self.selector}:{self.param:g}+"
                             f"{self.values.name}: every rank must use the same --mlp-compress")
        if their_numel != layout.numel or msg.numel() != self.message_nbytes(k, layout.num_groups):
            raise ValueError(f"{source} sent a {theirs} payload of {their_numel} values and {msg.numel()} bytes, "
                             f"this rank expects {layout.numel} values in {layout.num_groups} tensors: the "
                             "ranks' models differ")
        return k


def _segments(layout: Layout) -> list[tuple[int, int]]:
    """(start, size) of every scale group (each a tensor of the flat vector)."""
    return [(b.lo + i * b.cols, b.cols) for b in layout.blocks for i in range(b.rows)]


def _counts(idx: torch.Tensor, layout: Layout) -> list[int]:
    """Kept values per scale group, from the ascending indices."""
    ends = torch.tensor([lo + n for lo, n in _segments(layout)], dtype=torch.int64)
    cum = torch.searchsorted(idx, ends).tolist()
    return [b - a for a, b in zip([0, *cum[:-1]], cum)]


def _layout(groups: torch.Tensor | None, num_groups: int, numel: int) -> Layout:
    layout = Layout.from_groups(groups, num_groups, numel)
    if layout is None:
        raise ValueError("sparse compressors take scale groups that are contiguous runs (one per tensor)")
    return layout


register_parametric("topk", SparseCompressor)
register_parametric("threshold", SparseCompressor)
