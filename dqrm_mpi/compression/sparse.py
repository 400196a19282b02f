"""Sparsifying compressors for dense (MLP) gradients: top-k and threshold, with error feedback.

    topk:RATIO[+VALUES][@warmup=STEPS]   each gradient tensor sends its ceil(RATIO * numel) largest |values|
    threshold:VALUE[+VALUES]             every element with |x| >= VALUE is sent (a variable count per rank)

Sparsity warm-up (Deep Gradient Compression, Lin et al. 2018): with ``@warmup=STEPS`` the kept
ratio at global step s < STEPS is ``0.25 * (RATIO / 0.25) ** (s / STEPS)`` (exponential decay from
25 % to RATIO; RATIO from step STEPS on, and always when RATIO >= 0.25), the same on every rank.

VALUES (default ``none``: FP32) is the codec of the kept values: ``fp16``, ``int16``, ``int8``
or ``int4``, quantized with one scale per gradient tensor (``qcore.group_scales``: max|v| of
the tensor's kept values / qmax; INT4 packed by ``qcore``; the arithmetic in NumPy, the
same float32 operations bit for bit).  What is not sent (and the kept
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
  sample  (default) for each tensor keeping at least 512 values, a threshold estimated from a
          random sample, as Deep Gradient Compression does, aiming at about 2k candidates;
          one pass over the tensor keeps them (|x| >= threshold, no |x| copy), and its exact
          top-k is taken among them (``np.partition``).  A tensor whose estimate leaves fewer
          than k candidates, and every other tensor, takes the exact top-k of all its values,
          so the set equals ``exact`` (on vectors without NaN: ``sample`` never keeps one).
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
from dataclasses import dataclass

import numpy as np
import torch

from ..qcore import pack_int4_into, qrange, scale_from_max_, unpack_int4_into
from .base import ALLGATHER, Compressed, Compressor, get_compressor, register_parametric
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


def select_topk(x: torch.Tensor, k: int, method: str = "sample",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices int64 [k] (ascending) of the k largest |values| of a float32 [n] (a gradient, or
    its magnitudes).

    Ties at the k-th largest |value| are broken towards the lowest indices.  ``method``:
    exact or sample (the same set), chunk (per-chunk top-k, about k indices); see the module doc.
    """
    return select_topk_segments(x, [x.numel()], [k], method, generator)


def select_topk_segments(x: torch.Tensor, sizes: list[int], ks: list[int], method: str = "sample",
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """``select_topk`` of each segment (consecutive runs of ``sizes`` values of a float32 [n],
    keeping ks[t] of segment t): ascending indices into x.  ``chunk`` ignores the segments
    (chunks of 4,096 of the whole vector keep sum(ks) / n of their values)."""
    if method not in SELECT_METHODS:
        raise ValueError(f"select must be one of {SELECT_METHODS}, got {method!r}")
    ks = [max(0, min(k, n)) for k, n in zip(ks, sizes)]
    if method == "sample":
        return _sampled_topk(x, sizes, ks, generator)
    a = x.abs()
    return _chunk_topk(a, sum(ks)) if method == "chunk" else _exact_topk(a, sizes, ks)


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


@dataclass(frozen=True)
class _SamplePlan:
    """Which segments ``_sampled_topk`` samples (sizes and ks fixed): ``size`` random positions
    in each, the threshold its sample's ``rank``-th largest |value|."""

    los: tuple[int, ...]      # first value of every segment
    sampled: tuple[int, ...]  # the sampled segments
    size: int
    rank: int
    numel: np.ndarray         # float32 [sampled, 1]: their sizes (a uniform [0, 1) draw times this)
    last: np.ndarray          # int64 [sampled, 1]: their last position (float32 rounding up)
    lo: np.ndarray            # int64 [sampled, 1]: their first value


@functools.lru_cache(maxsize=64)
def _sample_plan(sizes: tuple[int, ...], ks: tuple[int, ...]) -> _SamplePlan:
    # a segment is sampled when it keeps at least MIN_SAMPLED_K values (below, its exact top-k
    # costs little more than a sample) and holds at least twice the sample that puts ~32 values
    # above its estimate (the count above it then falls short of k about once in 400 segments)
    los = tuple(int(v) for v in np.cumsum([0, *sizes[:-1]])) if sizes else ()
    need = [max(1024, math.ceil(16 * n / k)) if MIN_SAMPLED_K <= k < n else n + 1 for n, k in zip(sizes, ks)]
    sampled = tuple(i for i, (n, s) in enumerate(zip(sizes, need)) if n >= 2 * s)
    size = max((need[i] for i in sampled), default=0)
    rank = min(size, math.ceil(2 * size * max((ks[i] / sizes[i] for i in sampled), default=0)))
    column = lambda values, dtype: np.array(values, dtype=dtype).reshape(-1, 1)  # noqa: E731
    return _SamplePlan(los, sampled, size, rank, column([sizes[i] for i in sampled], np.float32),
                       column([sizes[i] - 1 for i in sampled], np.int64), column([los[i] for i in sampled], np.int64))


def _sampled_topk(x: torch.Tensor, sizes: list[int], ks: list[int],
                  generator: torch.Generator | None) -> torch.Tensor:
    """DGC-style, on the |values| of x (no |x| copy of the vector is made): for each segment
    keeping many values, a threshold estimated from a random sample, aiming at about 2k
    candidates, one pass over the segment for them, and the exact top-k among them; a segment
    whose estimate leaves fewer than k candidates, and every other segment, takes the exact
    top-k of all its values.  So the result equals ``exact``.  NumPy on the CPU (k-th values by
    ``np.partition``: a few us a segment, where torch.topk costs tens)."""
    if x.device.type != "cpu":
        return _sampled_topk(x.cpu(), sizes, ks, generator).to(x.device)
    plan = _sample_plan(tuple(sizes), tuple(ks))
    xn = x.detach().numpy()
    thresholds = {}
    if plan.sampled:
        pos = (torch.rand(len(plan.sampled), plan.size, generator=generator).numpy() * plan.numel).astype(np.int64)
        np.minimum(pos, plan.last, out=pos)
        pos += plan.lo
        at = plan.size - plan.rank
        thresholds = dict(zip(plan.sampled, np.partition(np.abs(xn[pos]), at, axis=1)[:, at]))
    mask = np.empty(-(-max((sizes[i] for i in plan.sampled), default=0) // 8) * 8, dtype=np.bool_)
    spare = np.empty_like(mask)
    parts = []
    for i, (lo, n, k) in enumerate(zip(plan.los, sizes, ks)):
        seg = xn[lo:lo + n]
        if i in thresholds:
            cand = _magnitude_at_least(seg, thresholds[i], mask[:-(-n // 8) * 8], spare)
            if cand.size >= k:
                parts.append(cand[_largest(np.abs(seg[cand]), k)] + lo)
                continue
            # else the estimate overshot: the segment's exact top-k
        parts.append(_largest(np.abs(seg), k) + lo)
    return torch.from_numpy(np.concatenate(parts) if parts else np.empty(0, dtype=np.int64))


def _kth_largest(v: np.ndarray, k: int) -> np.float32:
    """The k-th largest value of v (0 < k <= len(v))."""
    return np.partition(v, v.size - k)[v.size - k]


def _magnitude_at_least(v: np.ndarray, threshold: np.float32, mask: np.ndarray, spare: np.ndarray) -> np.ndarray:
    """Indices int64 [m] (ascending) of the values of float32 v [n] with |v| >= threshold (not
    NaN), through the bool scratch ``mask`` [n rounded up to a multiple of 8] and ``spare``
    [at least n]: two comparisons with the float32 threshold instead of a |v| copy."""
    n = v.size
    np.greater_equal(v, threshold, out=mask[:n])
    np.less_equal(v, -threshold, out=spare[:n])
    np.logical_or(mask[:n], spare[:n], out=mask[:n])
    mask[n:] = False
    return _sparse_flatnonzero(mask, spare[:mask.size // 8])


def _sparse_flatnonzero(mask: np.ndarray, words: np.ndarray) -> np.ndarray:
    """np.flatnonzero of a bool mask [8 m] that is mostly False (``words``: bool scratch [m]).
    NumPy's flatnonzero branches on every True below 10 % density (about 20 ns each); the
    8-byte words holding a True, then the bytes of those words, are dense enough for its
    branch-free loop."""
    w = mask.view(np.uint64)
    nz = np.flatnonzero(np.not_equal(w, 0, out=words))
    f = np.flatnonzero(w[nz].view(np.bool_))
    return (nz[f >> 3] << 3) | (f & 7)


def _largest(a: np.ndarray, k: int) -> np.ndarray:
    """Positions int64 (ascending) of the k largest values of float32 a [m] (magnitudes), ties
    at the k-th going to the lowest positions; NaN is never kept (so fewer than k when fewer
    other values)."""
    if k == 0:
        return np.empty(0, dtype=np.int64)
    if k >= a.size:
        return np.flatnonzero(a >= 0)
    kth = _kth_largest(a, k)
    keep = a >= kth
    pos = np.flatnonzero(keep)
    if pos.size == k:
        return pos
    if np.isnan(a).any():  # np.partition ranks NaN above every value: rank the others only
        valid = np.flatnonzero(a >= 0)
        return valid[_largest(a[valid], k)]
    np.greater(a, kth, out=keep)  # ties at the k-th value: the first of those equal to it
    keep[np.flatnonzero(a == kth)[:k - int(np.count_nonzero(keep))]] = True
    return np.flatnonzero(keep)


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
        self._last_groups: _Groups | None = None

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
        return sum(min(n, math.ceil(ratio * n)) for n in self._groups(layout).sizes)

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
        buf, ii = msg.numpy(), idx.cpu().numpy()
        _HEADER.pack_into(buf, 0, SELECTORS[self.selector], VALUE_CODECS.index(self.value_codec.name),
                          self.warmup, self.ratio_at(step), layout.numel, k)
        buf[HEADER:HEADER + 4 * k].view(np.int32)[:] = ii
        sent = self._encode_values(x.detach().cpu().numpy()[ii], self._groups(layout).runs(ii), buf[HEADER + 4 * k:])
        return msg, idx, torch.from_numpy(sent).to(x.device)

    def decode_add(self, msg: torch.Tensor, layout: Layout, out: torch.Tensor, source: str = "a rank",
                   step: int = 0) -> torch.Tensor:
        """Add the values of ``msg`` (encoded at global ``step``) into out float32 [n]; returns
        their indices int64 [k].  ValueError for a payload that another compressor (selector,
        parameter in force, warm-up, codec) or another vector size built."""
        buf = msg.cpu().numpy()
        k = self._check_header(buf, layout, source, step)
        ii = buf[HEADER:HEADER + 4 * k].view(np.int32).astype(np.int64)
        values = self._decode_values(buf[HEADER + 4 * k:], self._groups(layout).runs(ii), k)
        idx = torch.from_numpy(ii).to(out.device)
        out.index_add_(0, idx, torch.from_numpy(values).to(out.device))  # unique indices: one add each
        return idx

    def _encode_values(self, v: np.ndarray, runs: tuple[np.ndarray, np.ndarray], out: np.ndarray) -> np.ndarray:
        """Kept values float32 [k], in tensor order (``_Groups.runs``) -> their bytes in ``out``
        uint8 (data, then one FP32 scale per tensor for the integer codecs); returns what the
        receivers decode, float32 [k]."""
        codec = self.value_codec
        if codec.name == "none":
            out[:] = v.view(np.uint8)
            return v
        if codec.name == "fp16":
            half = torch.from_numpy(v).to(torch.float16)
            out[:] = half.numpy().view(np.uint8)
            return half.to(torch.float32).numpy()
        first, counts = runs
        qmin, qmax = qrange(codec.bits)
        absmax = np.zeros(counts.size, dtype=np.float32)  # qcore's rule: max|v| of the tensor / qmax
        if v.size:
            absmax[counts > 0] = np.maximum.reduceat(np.abs(v), first[counts > 0])
        scales = scale_from_max_(torch.from_numpy(absmax), codec.bits).numpy()
        per_value = np.repeat(scales, counts)
        q = np.divide(v, per_value)
        np.clip(np.rint(q, out=q), qmin, qmax, out=q)  # rint: half to even, as torch.round
        nd = codec.data_nbytes(v.size)
        if codec.bits == 4:
            pack_int4_into(torch.from_numpy(q), torch.from_numpy(out[:nd]))
        else:
            out[:nd].view(np.int8 if codec.bits == 8 else np.int16)[:] = q
        out[nd:] = scales.view(np.uint8)
        return np.multiply(q, per_value, out=q)

    def _decode_values(self, buf: np.ndarray, runs: tuple[np.ndarray, np.ndarray], k: int) -> np.ndarray:
        """The bytes ``_encode_values`` wrote for k values -> float32 [k]."""
        codec = self.value_codec
        if codec.name in ("none", "fp16"):
            return buf.view(np.float32 if codec.name == "none" else np.float16).astype(np.float32)
        nd = codec.data_nbytes(k)
        if codec.bits == 4:
            q = unpack_int4_into(torch.from_numpy(buf[:nd]).view(1, -1), torch.empty(1, k)).numpy().reshape(-1)
        else:
            q = buf[:nd].view(np.int8 if codec.bits == 8 else np.int16).astype(np.float32)
        return np.multiply(q, np.repeat(buf[nd:nd + 4 * runs[1].size].view(np.float32), runs[1]), out=q)

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
        if self.selector == "threshold":
            return _nonzero(torch.abs(x, out=self._scratch("abs", x)) >= self.param)
        sizes = self._groups(layout).sizes
        ratio = self.ratio_at(step)
        return select_topk_segments(x, sizes, [math.ceil(ratio * n) for n in sizes], self.select, self._generator)

    def _groups(self, layout: Layout) -> _Groups:
        """The groups of ``layout``, kept while the same layout comes back (hashing a Layout costs
        more than the codec's other bookkeeping)."""
        if self._last_groups is None or self._last_groups.layout is not layout:
            self._last_groups = _Groups(layout)
        return self._last_groups

    def _scratch(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like ``like`` reused across steps (one compressor per exchange): no
        fresh megabytes, and their page faults, every step."""
        b = self._buffers.get(key)
        if b is None or b.shape != like.shape or b.dtype != like.dtype or b.device != like.device:
            b = self._buffers[key] = torch.empty_like(like)
        return b

    @staticmethod
    def _describe(selector: str, param: float, codec: str, warmup: int) -> str:
        return f"{selector}:{param:g}+{codec}" + (f" (ratio in force of a {warmup}-step warm-up)" if warmup else "")

    def _check_header(self, buf: np.ndarray, layout: Layout, source: str, step: int) -> int:
        if buf.size < HEADER:
            raise ValueError(f"{self.name}: {source} sent a {buf.size}-byte payload, shorter than its header")
        sel, cod, warmup, param, their_numel, k = _HEADER.unpack_from(buf, 0)
        ratio = self.ratio_at(step)
        if (sel, cod, warmup, param) != (SELECTORS[self.selector], VALUE_CODECS.index(self.value_codec.name),
                                         self.warmup, ratio):
            raise ValueError(f"{source} sent a {_describe_header(sel, cod, param, warmup)} payload, this rank runs "
                             f"{self._describe(self.selector, ratio, self.value_codec.name, self.warmup)} at step "
                             f"{step}: every rank must use the same --mlp-compress (and step)")
        if their_numel != layout.numel or buf.size != self.message_nbytes(k, layout.num_groups):
            raise ValueError(f"{source} sent a {_describe_header(sel, cod, param, warmup)} payload of {their_numel} "
                             f"values and {buf.size} bytes, this rank expects {layout.numel} values in "
                             f"{layout.num_groups} tensors: the ranks' models differ")
        return k


def _describe_header(sel: int, cod: int, param: float, warmup: int) -> str:
    """A payload header's compressor as on the command line (``SparseCompressor._describe``)."""
    selector = {v: s for s, v in SELECTORS.items()}.get(sel, f"selector {sel}")
    codec = VALUE_CODECS[cod] if cod < len(VALUE_CODECS) else f"codec {cod}"
    return SparseCompressor._describe(selector, param, codec, warmup)


class _Groups:
    """The scale groups (the tensors: runs of the flat vector) of a ``Layout``."""

    def __init__(self, layout: Layout) -> None:
        runs = [(b.lo + i * b.cols, b.cols) for b in layout.blocks for i in range(b.rows)]
        self.layout = layout
        self.sizes = [n for _, n in runs]
        self.starts = np.array([lo for lo, _ in runs], dtype=np.int64)
        self.ends = np.array([lo + n for lo, n in runs], dtype=np.int64)

    def runs(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ascending flat indices int [k] -> (position in idx of each group's first index, how
        many of them it holds), int64 [groups] each."""
        first = np.searchsorted(idx, self.starts)
        return first, np.searchsorted(idx, self.ends) - first


def _layout(groups: torch.Tensor | None, num_groups: int, numel: int) -> Layout:
    layout = Layout.from_groups(groups, num_groups, numel)
    if layout is None:
        raise ValueError("sparse compressors take scale groups that are contiguous runs (one per tensor)")
    return layout


register_parametric("topk", SparseCompressor)
register_parametric("threshold", SparseCompressor)
