"""Sparsifying compressors for dense (MLP) gradients: top-k and threshold, with error feedback.

    topk:RATIO[+VALUES][@warmup=STEPS]   each gradient tensor sends its ceil(RATIO * numel) largest |values|
    threshold:VALUE[+VALUES]             every element with |x| >= VALUE is sent (a variable count per rank)

Sparsity warm-up (Deep Gradient Compression, Lin et al. 2018): with ``@warmup=STEPS`` the kept
ratio at global step s < STEPS is ``0.25 * (RATIO / 0.25) ** (s / STEPS)`` (exponential decay from
25 % to RATIO; RATIO from step STEPS on, and always when RATIO >= 0.25), the same on every rank.

VALUES (default ``none``: FP32) is the codec of the kept values: ``fp16``, ``int16``, ``int8``
or ``int4``, quantized with one scale per gradient tensor (``qcore.group_scales``: max|v| of
the tensor's kept values / qmax; INT4 packed by ``qcore``).  What is not sent (and the kept
values' rounding) stays in the error-feedback residual of the exchange.  Payloads are never
summed: they declare allgather, and every rank adds every rank's kept values into a dense
sum, in rank order.

Payload, one uint8 message per rank (little-endian)::

    header  32 bytes: uint8 selector (1 topk, 2 threshold), uint8 values codec, 2 zero bytes,
            uint32 warm-up steps, float64 parameter (the RATIO in force at this step, or VALUE),
            int64 numel, int64 k (values kept)
    indices int32 [k], ascending, into the flat vector
    values  the VALUES codec's bytes of the k kept values (scales last, one per tensor)

A receiver checks the header against its own compressor at the same step and refuses a payload
built with another selector, parameter (ratio in force), warm-up, codec or vector size.

Top-k selection (``select``), one call for all tensors of the flat vector:
  exact   ``torch.topk`` per tensor.
  sample  (default) a threshold per tensor estimated from a random sample, as Deep Gradient
          Compression does, aiming at about 2k candidates (tensors keeping fewer than 512
          values take torch.topk's k-th value instead); one pass over the vector keeps the
          candidates, and the exact top-k of each tensor is taken among them.  A tensor whose
          estimate leaves fewer than k candidates is redone with all its values, so the set
          equals ``exact``.
  chunk   per-chunk top-k of the whole flat vector (tensor boundaries ignored): each run of
          4,096 values keeps its ceil(k * 4096 / n) largest; about k in all, not the k largest.
Ties at a tensor's k-th largest |value| go to the lowest indices (exact and sample), so the
set is deterministic.
"""
from __future__ import annotations

import functools
import math
import re
import struct

import numpy as np
import torch

from ..qcore import group_scales, pack_int4_into, qrange, unpack_int4_into
from .base import ALLGATHER, Compressed, Compressor, as_bytes, from_bytes, get_compressor, register_parametric
from .layout import Layout

SELECTORS = {"topk": 1, "threshold": 2}
VALUE_CODECS = ("none", "fp16", "int16", "int8", "int4")
SELECT_METHODS = ("sample", "exact", "chunk")
HEADER = 32
_HEADER = struct.Struct("<BBxxIdqq")  # selector, codec, 2 zero bytes, warm-up, parameter, numel, k
CHUNK = 4096
MIN_SAMPLED_K = 512
WARMUP_START = 0.25  # kept ratio at step 0 of a warm-up (DGC's first stage)
MAX_WARMUP = 2**32 - 1  # the header's uint32
SPEC_FORM = ("topk:RATIO[+VALUES][@warmup=STEPS] (0 < RATIO <= 1, e.g. topk:0.01+int8@warmup=200) or "
             f"threshold:VALUE[+VALUES] (VALUE > 0, e.g. threshold:1e-4); VALUES one of {', '.join(VALUE_CODECS)}")
_SPEC = re.compile(r"^(topk|threshold):([^+@]+)(?:\+(\w+))?(?:@warmup=(\d+))?$")


def parse_spec(spec: str) -> tuple[str, float, str, int]:
    """'topk:0.01+int8@warmup=200' -> ('topk', 0.01, 'int8', 200) (warm-up 0 when absent);
    ValueError giving the expected form."""
    m = _SPEC.match(spec.strip())
    try:
        param = float(m.group(2)) if m else math.nan
    except ValueError:
        param = math.nan
    values = (m.group(3) or "none") if m else ""
    warmup = int(m.group(4) or 0) if m else 0
    ok = m is not None and math.isfinite(param) and values in VALUE_CODECS and param > 0 and \
        (m.group(1) != "topk" or param <= 1) and (m.group(1) == "topk" or not m.group(4)) and warmup <= MAX_WARMUP
    if not ok:
        raise ValueError(f"expected {SPEC_FORM}; got {spec!r}")
    return m.group(1), param, values, warmup


def warmup_ratio(target: float, warmup: int, step: int) -> float:
    """The kept ratio at global ``step`` of a top-k warm-up of ``warmup`` steps towards ``target``:
    WARMUP_START * (target / WARMUP_START) ** (step / warmup) before it ends, then ``target``."""
    if step >= warmup or target >= WARMUP_START:
        return target
    return WARMUP_START * (target / WARMUP_START) ** (max(step, 0) / warmup)


def select_topk(a: torch.Tensor, k: int, method: str = "sample",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices int64 [k] (ascending) of the k largest values of a float32 [n] (|gradient|).

    Ties at the k-th largest value are broken towards the lowest indices.  ``method``:
    exact or sample (the same set), chunk (per-chunk top-k, about k indices); see the module doc.
    """
    return select_topk_segments(a, [a.numel()], [k], method, generator)


def select_topk_segments(a: torch.Tensor, sizes: list[int], ks: list[int], method: str = "sample",
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """``select_topk`` of each segment (consecutive runs of ``sizes`` values of a float32 [n],
    keeping ks[t] of segment t): ascending indices into a.  ``chunk`` ignores the segments
    (chunks of 4,096 of the whole vector keep sum(ks) / n of their values)."""
    if method not in SELECT_METHODS:
        raise ValueError(f"select must be one of {SELECT_METHODS}, got {method!r}")
    ks = [max(0, min(k, n)) for k, n in zip(ks, sizes)]
    if method == "chunk":
        return _chunk_topk(a, sum(ks))
    if method == "exact":
        return _exact_topk(a, sizes, ks)
    return _sampled_topk(a, sizes, ks, generator)


def _exact_topk(a: torch.Tensor, sizes: list[int], ks: list[int]) -> torch.Tensor:
    parts, lo = [], 0
    for n, k in zip(sizes, ks):
        parts.append(_topk_ties_low(a[lo:lo + n], k) + lo)
        lo += n
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices int64 [m] of the True values of a 1-D bool mask (numpy's flatnonzero on the CPU:
    several times faster than torch.nonzero there)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask).squeeze(1)


def _topk_ties_low(a: torch.Tensor, k: int) -> torch.Tensor:
    """Exact: torch.topk for the k-th largest value, then the values above it and the first
    of those equal to it (ascending indices)."""
    if k >= a.numel():
        return torch.arange(a.numel())
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    top = torch.topk(a, k, sorted=False)
    kth = top.values.min()
    if int((a >= kth).sum()) == k:  # no value outside the top k ties with its smallest
        return top.indices.sort().values
    above = _nonzero(a > kth)
    at = _nonzero(a == kth)[:k - above.numel()]
    return torch.cat([above, at]).sort().values


def _sampled_topk(a: torch.Tensor, sizes: list[int], ks: list[int],
                  generator: torch.Generator | None) -> torch.Tensor:
    """DGC-style: a threshold per segment from a random sample, aiming at about 2k candidates
    (segments keeping too few values to sample use their exact k-th value, small ones take
    all their values as candidates; ``exact`` when no segment is worth sampling), then the
    exact top-k of each segment among its candidates: one pass over a for the candidates, the
    rest on about 2k values.  A segment whose estimate leaves fewer than k candidates takes
    all its values instead, so the result equals ``exact``.  The work after the sample is done
    in NumPy on the CPU (k-th values by ``np.partition``: a few us a segment, where torch.topk
    costs tens)."""
    if a.device.type != "cpu":
        return _sampled_topk(a.cpu(), sizes, ks, generator).to(a.device)
    t = len(sizes)
    los = [0]
    for n in sizes[:-1]:
        los.append(los[-1] + n)
    # a segment is sampled when it keeps at least MIN_SAMPLED_K values (below, torch.topk is the
    # cheaper way to its k-th value) and holds at least twice the sample that puts ~32 values
    # above its estimate (the count above it then falls short of k about once in 400 segments)
    need = [max(1024, math.ceil(16 * n / k)) if MIN_SAMPLED_K <= k < n else n + 1 for n, k in zip(sizes, ks)]
    sampled = [i for i, (n, s) in enumerate(zip(sizes, need)) if n >= 2 * s]
    if not sampled:
        return _exact_topk(a, sizes, ks)
    an = a.detach().numpy()
    thresholds = [0.0] * t
    sample = max(need[i] for i in sampled)
    above = min(sample, math.ceil(2 * sample * max(ks[i] / sizes[i] for i in sampled)))
    pos = (torch.rand(len(sampled), sample, generator=generator)
           * torch.tensor([sizes[i] for i in sampled], dtype=torch.float32).unsqueeze(1)).long()
    pos.clamp_(max=torch.tensor([sizes[i] - 1 for i in sampled]).unsqueeze(1))  # float32 rounding up
    pos += torch.tensor([los[i] for i in sampled]).unsqueeze(1)
    estimates = np.partition(an[pos.numpy()], sample - above, axis=1)[:, sample - above].tolist()
    for i, e in zip(sampled, estimates):
        thresholds[i] = e
    for i, (lo, n, k) in enumerate(zip(los, sizes, ks)):
        if k == 0:
            thresholds[i] = math.inf
        elif i not in sampled and k < n and n > CHUNK:  # not worth sampling: the exact k-th value
            thresholds[i] = float(_kth_largest(an[lo:lo + n], k))
    mask = torch.empty(a.numel(), dtype=torch.bool)
    for _ in range(2):  # a second pass only when an estimate overshot
        _at_least(a, los, sizes, thresholds, mask)
        cand = np.flatnonzero(mask.numpy())
        bounds = np.searchsorted(cand, [*los, a.numel()]).tolist()
        short = [i for i in range(t) if bounds[i + 1] - bounds[i] < ks[i]]
        if not short:
            break
        for i in short:
            thresholds[i] = 0.0
    # the k-th largest candidate of each segment, then the values above it and, of those equal
    # to it, the lowest indices
    values = an[cand]
    counts = np.diff(bounds)
    kth = np.array([_kth_largest(values[b0:b1], k) if 0 < k < b1 - b0 else (-np.inf if k else np.inf)
                    for b0, b1, k in zip(bounds[:-1], bounds[1:], ks)], dtype=np.float32)
    kth_c = np.repeat(kth, counts)
    keep = values >= kth_c  # every segment has at least k candidates >= its kth: exactly k unless ties
    if int(np.count_nonzero(keep)) != sum(ks):
        seg = np.repeat(np.arange(t), counts)
        above_c = values > kth_c
        at_c = values == kth_c
        n_above = np.bincount(seg, weights=above_c, minlength=t).astype(np.int64)
        at_rank = np.cumsum(at_c)
        at_before = np.concatenate([[0], at_rank])[bounds[:-1]]
        keep = above_c | (at_c & (at_rank - at_before[seg] <= (np.array(ks) - n_above)[seg]))
    return torch.from_numpy(cand[keep])


def _kth_largest(v: np.ndarray, k: int) -> np.float32:
    """The k-th largest value of v (0 < k <= len(v))."""
    return np.partition(v, v.size - k)[v.size - k]


def _at_least(a: torch.Tensor, los: list[int], sizes: list[int], thresholds: list[float], mask: torch.Tensor) -> None:
    """mask[i] = a[i] >= the threshold of i's segment (bool [n]); numpy on the CPU (several times
    faster than torch.ge there; the thresholds are float32 values, so both compare alike)."""
    if a.device.type == "cpu":
        an, mn = a.numpy(), mask.numpy()
        for lo, n, thr in zip(los, sizes, thresholds):
            np.greater_equal(an[lo:lo + n], np.float32(thr), out=mn[lo:lo + n])
        return
    for lo, n, thr in zip(los, sizes, thresholds):
        torch.ge(a[lo:lo + n], thr, out=mask[lo:lo + n])


def _chunk_topk(a: torch.Tensor, k: int) -> torch.Tensor:
    n = a.numel()
    if k >= n:
        return torch.arange(n)
    full, tail = divmod(n, CHUNK)
    parts = []
    if full:
        kc = math.ceil(k * CHUNK / n)
        idx = torch.topk(a[:full * CHUNK].view(full, CHUNK), kc, dim=1, sorted=False).indices
        parts.append((idx + torch.arange(full).unsqueeze(1) * CHUNK).reshape(-1))
    if tail:
        parts.append(torch.topk(a[full * CHUNK:], math.ceil(k * tail / n), sorted=False).indices + full * CHUNK)
    return torch.cat(parts).sort().values if parts else torch.empty(0, dtype=torch.int64)


class SparseCompressor(Compressor):
    """top-k or threshold sparsification of a flat vector whose scale groups (``Layout``) are
    its tensors; see the module doc.  ``spec`` as on the command line, e.g. ``topk:0.01+int8``."""

    linear = False
    collective = ALLGATHER
    sparse = True  # variable-size payloads of (index, value): DenseExchange's sparse path

    def __init__(self, spec: str, select: str = "sample", seed: int = 0) -> None:
        if select not in SELECT_METHODS:
            raise ValueError(f"select must be one of {SELECT_METHODS}, got {select!r}")
        self.selector, self.param, values, self.warmup = parse_spec(spec)
        self.name = spec
        self.value_codec = get_compressor(values)
        self.bits = self.value_codec.bits
        self.select = select
        self._generator = torch.Generator().manual_seed(seed)  # the sampling (not the result)
        self._buffers: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"SparseCompressor({self.name!r}, select={self.select!r})"

    # -- sizes -------------------------------------------------------------------
    def ratio_at(self, step: int) -> float:
        """The parameter in force at global ``step``: the warmed-up top-k ratio, else RATIO or VALUE."""
        return warmup_ratio(self.param, self.warmup, step) if self.selector == "topk" else self.param

    def kept(self, layout: Layout, step: int | None = None) -> int | None:
        """Values a top-k payload keeps for this layout (exact/sample selection) at ``step`` (None:
        after any warm-up); None for threshold."""
        if self.selector != "topk" or self.select == "chunk":
            return None
        ratio = self.param if step is None else self.ratio_at(step)
        return sum(min(n, math.ceil(ratio * n)) for _, n in _segments(layout))

    def message_nbytes(self, k: int, num_groups: int) -> int:
        return HEADER + 4 * k + self.value_codec.nbytes(k, num_groups)

    def nbytes(self, numel: int, num_groups: int = 1) -> int:
        """Upper bound (every value kept); the top-k size is ``message_nbytes(kept(layout), groups)``."""
        return self.message_nbytes(numel, num_groups)

    # -- the exchange's form ---------------------------------------------------------
    def encode(self, x: torch.Tensor, layout: Layout, step: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x float32 [n] at global ``step`` (the warm-up's clock) -> (message uint8, kept indices
        int64 [k] ascending, their values float32 [k] as the receivers will decode them)."""
        idx = self._indices(x, layout, step)
        k = idx.numel()
        msg = torch.empty(self.message_nbytes(k, layout.num_groups), dtype=torch.uint8)
        msg[:HEADER].copy_(self._header(layout.numel, k, step))
        msg[HEADER:HEADER + 4 * k].copy_(as_bytes(idx.to(torch.int32)))
        sent = self._encode_values(x[idx], _segment_of(idx, layout), layout.num_groups, msg[HEADER + 4 * k:])
        return msg, idx, sent

    def decode_add(self, msg: torch.Tensor, layout: Layout, out: torch.Tensor, source: str = "a rank",
                   step: int = 0) -> torch.Tensor:
        """Add the values of ``msg`` (encoded at global ``step``) into out float32 [n]; returns
        their indices int64 [k].  ValueError for a payload that another compressor (selector,
        parameter in force, warm-up, codec) or another vector size built."""
        k = self._check_header(msg, layout, source, step)
        idx = from_bytes(msg[HEADER:HEADER + 4 * k], torch.int32).to(torch.int64)
        out.index_add_(0, idx, self._decode_values(msg[HEADER + 4 * k:], _segment_of(idx, layout),
                                                   layout.num_groups, k))
        return idx

    def _encode_values(self, v: torch.Tensor, seg: torch.Tensor, groups: int, out: torch.Tensor) -> torch.Tensor:
        """Kept values float32 [k] of tensors ``seg`` int64 [k] -> their bytes in ``out`` (data,
        then one FP32 scale per tensor for the integer codecs); returns what receivers decode."""
        codec = self.value_codec
        if codec.name == "none":
            out.copy_(as_bytes(v))
            return v
        if codec.name == "fp16":
            half = v.to(torch.float16)
            out.copy_(as_bytes(half))
            return half.to(torch.float32)
        qmin, qmax = qrange(codec.bits)
        scales = group_scales(v, seg, groups, codec.bits)  # qcore's rule: max|v| of the tensor / qmax
        per_value = scales[seg]
        q = torch.div(v, per_value).round_().clamp_(qmin, qmax)
        nd = codec.data_nbytes(v.numel())
        if codec.bits == 4:
            pack_int4_into(q, out[:nd])
        else:
            out[:nd].copy_(as_bytes(q.to(torch.int8 if codec.bits == 8 else torch.int16)))
        out[nd:].copy_(as_bytes(scales))
        return q.mul_(per_value)

    def _decode_values(self, buf: torch.Tensor, seg: torch.Tensor, groups: int, k: int) -> torch.Tensor:
        codec = self.value_codec
        if codec.name in ("none", "fp16"):
            return from_bytes(buf, codec.wire_dtype).to(torch.float32)
        nd = codec.data_nbytes(k)
        scales = from_bytes(buf[nd:nd + 4 * groups], torch.float32)
        if codec.bits == 4:
            q = unpack_int4_into(buf[:nd].view(1, -1), torch.empty(1, k)).view(-1)
        else:
            q = from_bytes(buf[:nd], torch.int8 if codec.bits == 8 else torch.int16).to(torch.float32)
        return q.mul_(scales[seg])

    # -- Compressor interface ----------------------------------------------------------
    def compress(self, x, groups=None, num_groups=1):
        msg, _, _ = self.encode(x.to(torch.float32), _layout(groups, num_groups, x.numel()))
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
    def _indices(self, x: torch.Tensor, layout: Layout, step: int) -> torch.Tensor:
        a = torch.abs(x, out=self._scratch("abs", x))
        if self.selector == "threshold":
            return _nonzero(a >= self.param)
        sizes = [n for _, n in _segments(layout)]
        ratio = self.ratio_at(step)
        return select_topk_segments(a, sizes, [math.ceil(ratio * n) for n in sizes], self.select, self._generator)

    def _scratch(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like ``like`` reused across steps (one compressor per exchange): no
        fresh megabytes, and their page faults, every step."""
        b = self._buffers.get(key)
        if b is None or b.shape != like.shape or b.dtype != like.dtype or b.device != like.device:
            b = self._buffers[key] = torch.empty_like(like)
        return b

    def _describe(self, selector: str, param: float, codec: str, warmup: int) -> str:
        return f"{selector}:{param:g}+{codec}" + (f" (ratio in force of a {warmup}-step warm-up)" if warmup else "")

    def _header(self, numel: int, k: int, step: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(_HEADER.pack(SELECTORS[self.selector], VALUE_CODECS.index(
            self.value_codec.name), self.warmup, self.ratio_at(step), numel, k)), dtype=torch.uint8)

    def _check_header(self, msg: torch.Tensor, layout: Layout, source: str, step: int) -> int:
        if msg.numel() < HEADER:
            raise ValueError(f"{self.name}: {source} sent a {msg.numel()}-byte payload, shorter than its header")
        sel, cod, warmup, param, their_numel, k = _HEADER.unpack(msg[:HEADER].numpy().tobytes())
        selector = {v: s for s, v in SELECTORS.items()}.get(sel, f"selector {sel}")
        codec = VALUE_CODECS[cod] if cod < len(VALUE_CODECS) else f"codec {cod}"
        theirs = self._describe(selector, param, codec, warmup)
        mine = (self.selector, self.ratio_at(step), self.value_codec.name, self.warmup)
        if (selector, param, codec, warmup) != mine:
            raise ValueError(f"{source} sent a {theirs} payload, this rank runs {self._describe(*mine)} at step "
                             f"{step}: every rank must use the same --mlp-compress (and step)")
        if their_numel != layout.numel or msg.numel() != self.message_nbytes(k, layout.num_groups):
            raise ValueError(f"{source} sent a {theirs} payload of {their_numel} values and {msg.numel()} bytes, "
                             f"this rank expects {layout.numel} values in {layout.num_groups} tensors: the "
                             "ranks' models differ")
        return k


@functools.lru_cache(maxsize=64)
def _segments(layout: Layout) -> list[tuple[int, int]]:
    """(start, size) of every scale group (each a tensor of the flat vector); not to be modified."""
    return [(b.lo + i * b.cols, b.cols) for b in layout.blocks for i in range(b.rows)]


@functools.lru_cache(maxsize=64)
def _segment_ends(layout: Layout) -> torch.Tensor:
    """int64 [groups]: the end of every scale group; not to be modified."""
    return torch.tensor([lo + n for lo, n in _segments(layout)], dtype=torch.int64)


def _segment_of(idx: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The scale group (tensor) of each ascending flat index: int64 [k]."""
    return torch.searchsorted(_segment_ends(layout), idx, right=True)


def _layout(groups: torch.Tensor | None, num_groups: int, numel: int) -> Layout:
    layout = Layout.from_groups(groups, num_groups, numel)
    if layout is None:
        raise ValueError("sparse compressors take scale groups that are contiguous runs (one per tensor)")
    return layout


register_parametric("topk", SparseCompressor)
register_parametric("threshold", SparseCompressor)
