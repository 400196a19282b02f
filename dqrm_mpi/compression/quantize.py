"""Symmetric uniform quantization with one scale per group (INT16, INT8, INT4).

scale_g = max|x| over group g / qmax, q = clamp(round(x / scale), -qmax - 1, qmax),
x_hat = q * scale (``qcore``'s bit range and scale rule).  The error per element is at most
scale_g / 2.  INT16 and INT8 travel as two's-complement integers, INT4 as ``qcore``'s packed
INT4 (two values per byte, low nibble first, stored as q + 8).

Speed: groups are contiguous runs of elements (an output channel, a bias, an embedding row
or table), described by a ``Layout`` of 2-D blocks whose rows are groups.  Per-group absmax
is then ``amax(dim=1)`` on a view, and scales broadcast over rows, with no per-element
group index, scatter or gather.  ``encode_into`` / ``decode_many`` write into caller-owned
buffers and decode every rank's payload in one pass.  INT8 and INT4 encode (and, with one
torch thread, ``decode_mean`` averages) unit by unit: about 64 k values of whole rows at a
time, so each unit's passes (|x|, absmax, x / scale, round, the cast into the payload, q *
scale into the transmitted values or straight off the residual with ``encode_feedback_into``;
no clamp) work in the core's cache instead of moving the vector through memory once per pass.
INT4 packs and unpacks through int16 views of the bytes (``qcore.pack``).

With the fused CPU kernels (``dqrm_mpi.kernels``, ``csrc/codec.cpp``) INT8 and INT4 encode,
``decode_many`` and ``decode_mean`` of CPU tensors run as one pass per row instead (absmax,
scale, round, the payload's integers and the residual or transmitted values while the row is
in cache), with the same float operations: the PyTorch path above gives the same bytes and
values bit for bit (``kernels.disabled()``).
"""
from __future__ import annotations

import functools
import sys

import numpy as np
import torch

from .. import kernels
from ..qcore import group_scales, pack_int4_into, qrange, scale_from_max_, unpack_int4_into
from ..qcore.pack import unpack_int4_int8
from .base import ALLGATHER, Compressed, Compressor, register
from .layout import Layout

_LITTLE_ENDIAN = sys.byteorder == "little"
UNIT = 65_536  # values per unit of the blocked encoder and of ``mean_of_payloads`` (256 KiB of float32)


@functools.lru_cache(maxsize=64)
def units(layout: Layout, unit: int = UNIT) -> tuple[tuple[int, int, int, int, int], ...]:
    """The layout cut into units of whole rows of one block, about ``unit`` values each (a block
    row longer than that is one unit): (lo, hi, rows, cols, first group) per unit, empty blocks
    left out.  Only for layouts whose rows are their own groups (no ``row_group``)."""
    out = []
    for b in layout.blocks:
        if not (b.rows and b.cols):
            continue
        step = max(1, unit // b.cols)
        for r0 in range(0, b.rows, step):
            r1 = min(r0 + step, b.rows)
            out.append((b.lo + r0 * b.cols, b.lo + r1 * b.cols, r1 - r0, b.cols, b.g_lo + r0))
    return tuple(out)


def blockable(layout: Layout) -> bool:
    """Whether ``units`` applies: every group is one row of a block (no ``row_group``)."""
    return all(b.row_group is None for b in layout.blocks)


def kernel_layout(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout as the codec kernels take it: blocks int64 [B, 4] (lo, rows, cols, first group)
    of its non-empty blocks, and row_group int64 [their rows] (each row's group; empty when every
    row is its own group, ``blockable``)."""
    if blockable(layout):
        return _own_rows_layout(layout)
    used = [b for b in layout.blocks if b.rows and b.cols]
    blocks = torch.tensor([[b.lo, b.rows, b.cols, b.g_lo] for b in used], dtype=torch.int64).view(-1, 4)
    groups = [torch.arange(b.g_lo, b.g_lo + b.rows) if b.row_group is None else b.row_group for b in used]
    row_group = groups[0] if len(groups) == 1 else torch.cat(groups) if groups else torch.empty(0)
    return blocks, row_group.to(device="cpu", dtype=torch.int64).contiguous()


@functools.lru_cache(maxsize=64)
def _own_rows_layout(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = [[b.lo, b.rows, b.cols, b.g_lo] for b in layout.blocks if b.rows and b.cols]
    return torch.tensor(blocks, dtype=torch.int64).view(-1, 4), torch.empty(0, dtype=torch.int64)


def _kernel_ready(*tensors: torch.Tensor | None) -> bool:
    """Whether the codec kernels take these tensors (None: not given): the kernels are on, and each
    is on the CPU, a vector or a matrix, its last dimension contiguous."""
    return kernels.enabled() and all(t is None or (t.device.type == "cpu" and t.dim() in (1, 2) and t.stride(-1) == 1)
                                     for t in tensors)


def quantize_units_into(x: torch.Tensor, layout: Layout, bits: int, q: torch.Tensor, scales: torch.Tensor,
                        transmitted: torch.Tensor | None = None, feedback: bool = False) -> None:
    """``quantize_into``'s numbers unit by unit (``units``; ``blockable(layout)``): x float32 [n]
    -> q int8 [n] (the integers; bits <= 8) and scales float32 [groups]; transmitted float32 [n],
    when given, receives q * scale; with ``feedback`` x itself becomes x - q * scale (the
    error-feedback residual) instead.

    A unit's passes (|x|, absmax per row, scale, x / scale, round, the cast, q * scale) run on
    about 256 KiB that stay in the core's cache, where whole-vector passes would each move the
    vector (and its copies) through memory; units much smaller than that cost more in per-call
    overhead than they save."""
    scratch = torch.empty(max(UNIT, max(b.cols for b in layout.blocks)), dtype=torch.float32, device=x.device)
    scale_from_max_(scales.zero_(), bits)  # the scale of an empty group
    for lo, hi, rows, cols, g in units(layout):
        xs, a, m = x[lo:hi].view(rows, cols), scratch[:hi - lo].view(rows, cols), scales[g:g + rows]
        torch.abs(xs, out=a)
        torch.amax(a, dim=1, out=m)
        scale_from_max_(m, bits)
        mc = m.unsqueeze(1)
        torch.div(xs, mc, out=a)
        a.round_()
        q[lo:hi].view(rows, cols).copy_(a)
        if feedback:
            xs.sub_(a.mul_(mc))
        elif transmitted is not None:
            torch.mul(a, mc, out=transmitted[lo:hi].view(rows, cols))


def quantize_into(x: torch.Tensor, layout: Layout, bits: int, q: torch.Tensor, scales: torch.Tensor) -> None:
    """x float32 [n] -> q float32 [n] (integral values in [qmin, qmax]) and scales float32 [groups].

    In place over the layout's blocks, dividing by the scale (the codecs' arithmetic since their
    first version; ``qcore.quantize`` multiplies by 1/scale as PyTorch's fake-quant kernels do).
    No clamp: a scale is a normal float at most 2^-24 (relative) below max|x| / qmax, so
    |x| / scale <= qmax * (1 + 2^-23) rounds to at most qmax (a NaN stays NaN, as with a clamp).
    """
    torch.abs(x, out=q)
    scales.zero_()
    for b in layout.blocks:
        if b.rows and b.cols:
            rows = q[b.lo:b.hi].view(b.rows, b.cols)
            if b.row_group is None:
                torch.amax(rows, dim=1, out=scales[b.g_lo:b.g_lo + b.rows])
            else:
                scales.scatter_reduce_(0, b.row_group, rows.amax(dim=1), reduce="amax", include_self=True)
    scale_from_max_(scales, bits)
    for b in layout.blocks:
        if b.rows and b.cols:
            torch.div(x[b.lo:b.hi].view(b.rows, b.cols), b.row_scales(scales).unsqueeze(-1),
                      out=q[b.lo:b.hi].view(b.rows, b.cols))
    q.round_()


def scale_rows_(values: torch.Tensor, scales: torch.Tensor, layout: Layout) -> torch.Tensor:
    """In place: values float32 [r, n] (integers) *= their groups' scales [r, groups]."""
    return scale_rows_into(values, scales, layout, values)


def scale_rows_into(q: torch.Tensor, scales: torch.Tensor, layout: Layout, out: torch.Tensor) -> torch.Tensor:
    """out float32 [r, n] = q float32 [r, n] (integers) times their groups' scales [r, groups]."""
    r = q.shape[0]
    for b in layout.blocks:
        if b.rows and b.cols:
            torch.mul(q[:, b.lo:b.hi].view(r, b.rows, b.cols), b.row_scales(scales, dim=1).unsqueeze(-1),
                      out=out[:, b.lo:b.hi].view(r, b.rows, b.cols))
    return out


def quantize(x: torch.Tensor, groups: torch.Tensor | None, num_groups: int,
             bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int16 [n], scales float32 [num_groups])."""
    x = x.to(torch.float32)
    layout = Layout.from_groups(groups, num_groups, x.numel())
    if layout is None:  # groups not contiguous: the general (slower) path
        qmin, qmax = qrange(bits)
        scales = group_scales(x, groups, num_groups, bits)
        return torch.round(x / scales[groups]).clamp_(qmin, qmax).to(torch.int16), scales
    q = torch.empty_like(x)
    scales = torch.empty(layout.num_groups, dtype=torch.float32, device=x.device)
    quantize_into(x, layout, bits, q, scales)
    return q.to(torch.int16), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    layout = Layout.from_groups(groups, scales.numel(), q.numel())
    if layout is None:
        return q.to(torch.float32) * scales[groups]
    return scale_rows_(q.to(torch.float32).reshape(1, -1), scales.reshape(1, -1), layout).reshape(-1)


def mean_of_payloads(q: np.ndarray, scales: np.ndarray, layout: Layout, size: int, out: torch.Tensor) -> torch.Tensor:
    """Every rank's integers q [r, >= n] (rank order) and scales float32 [r, groups] -> out
    float32 [n] (CPU) = (q_0 * s_0 + q_1 * s_1 + ...) / size, summed in rank order: the numbers
    of ``scale_rows_`` per rank, then a rank-order sum and a division, bit for bit.

    Unit by unit (about ``UNIT`` values of whole rows of one block) in NumPy: the per-rank
    values of a unit live in a small scratch buffer in the core's cache, so the payloads are
    read once and the mean written once, where whole-vector passes would write and re-read
    r float copies of the vector (and a NumPy call costs about 1 us against about 5 for torch).
    Single-threaded: ``decode_mean`` uses it when torch runs one thread per rank (ranks sharing
    a node's cores), and PyTorch's passes, which spread over threads, otherwise."""
    on = out.numpy()
    scratch = np.empty(max([UNIT, *(b.cols for b in layout.blocks)]), dtype=np.float32)
    # x / 2^k and x * 2^-k are the same float (both the rounded x / 2^k); a multiply is cheaper
    power_of_two = size & (size - 1) == 0
    for lo, hi, shape, rs in _scaled_units(layout, scales):
        acc, t = on[lo:hi].reshape(shape), scratch[:hi - lo].reshape(shape)
        np.copyto(acc, q[0, lo:hi].reshape(shape))
        np.multiply(acc, rs[0, :, None], out=acc)
        for r in range(1, q.shape[0]):
            np.copyto(t, q[r, lo:hi].reshape(shape))
            np.multiply(t, rs[r, :, None], out=t)
            np.add(acc, t, out=acc)
        if power_of_two:
            np.multiply(acc, np.float32(1 / size), out=acc)
        else:
            np.divide(acc, np.float32(size), out=acc)
    return out


def _scaled_units(layout: Layout, scales: np.ndarray):
    """(lo, hi, (rows, cols), the rows' scales [r, rows]) of every unit of whole rows of one block
    (``units`` when the layout is ``blockable``), scales float32 [r, groups]."""
    if blockable(layout):
        for lo, hi, rows, cols, g in units(layout):
            yield lo, hi, (rows, cols), scales[:, g:g + rows]
        return
    for b in layout.blocks:
        if not (b.rows and b.cols):
            continue
        rs = scales[:, b.g_lo:b.g_lo + b.rows] if b.row_group is None else scales[:, b.row_group.numpy()]
        step = max(1, UNIT // b.cols)
        for r0 in range(0, b.rows, step):
            r1 = min(r0 + step, b.rows)
            yield b.lo + r0 * b.cols, b.lo + r1 * b.cols, (r1 - r0, b.cols), rs[:, r0:r1]


def _pack_int4_from_int8(u: torch.Tensor, n: int, out: torch.Tensor) -> None:
    """u uint8 [2 m] whose first n bytes are int8 values in [-8, 7] (u is overwritten) -> out uint8
    [m], the bytes of ``qcore.pack_int4_into`` (q + 8, two values a byte, the low nibble first),
    without its copy of the values."""
    if not _LITTLE_ENDIAN:
        pack_int4_into(u[:n].view(torch.int8), out)
        return
    u[:n].add_(8)  # uint8 arithmetic wraps -8..-1 to 0..7
    u[n:] = 0  # the padding nibble of an odd n
    pairs = u.view(torch.int16)  # lo + 256 hi -> lo | hi << 4 in its low byte
    out.copy_(pairs.bitwise_right_shift(4).bitwise_or_(pairs))


class _IntCompressor(Compressor):
    linear = False
    collective = ALLGATHER

    def compress(self, x, groups=None, num_groups=1):
        q, scales = quantize(x, groups, num_groups, self.bits)
        return Compressed(self._pack(q), scales, x.numel())

    def decompress(self, c, groups=None):
        return dequantize(self._unpack(c.data, c.numel), c.scales, groups)

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _unpack(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        raise NotImplementedError

    # -- the fast path used by the exchanges ------------------------------------------
    def encode_into(self, x, layout, out, transmitted=None, work=None):
        self._encode(x, layout, out, transmitted, work, feedback=False)

    def encode_feedback_into(self, x, layout, out, work=None):
        self._encode(x, layout, out, None, work, feedback=True)

    def _encode(self, x: torch.Tensor, layout: Layout, out: torch.Tensor, transmitted: torch.Tensor | None,
                work: torch.Tensor | None, feedback: bool) -> None:
        """``encode_into`` (``feedback``: ``encode_feedback_into``): INT8 and INT4 through the codec
        kernels (CPU), else unit by unit when every group is a row of a block, else in whole-vector
        passes."""
        n, nd = x.numel(), self.data_nbytes(x.numel())
        if self.bits <= 8 and _kernel_ready(x, out, transmitted) and x.dtype == torch.float32:
            blocks, row_group = kernel_layout(layout)
            kernels.ops.codec_encode(x, blocks, row_group, layout.num_groups, self.bits, out, transmitted, feedback)
            return
        scales = torch.empty(layout.num_groups, dtype=torch.float32, device=x.device)
        if self.bits <= 8 and n and blockable(layout):
            if self.bits == 8:
                quantize_units_into(x, layout, self.bits, out[:nd].view(torch.int8), scales, transmitted, feedback)
            else:  # the integers straight into the bytes that ``pack_int4_into`` would copy them to
                u = torch.empty(2 * nd, dtype=torch.uint8, device=x.device)
                quantize_units_into(x, layout, self.bits, u[:n].view(torch.int8), scales, transmitted, feedback)
                _pack_int4_from_int8(u, n, out[:nd])
        else:
            q = work if work is not None else torch.empty(n, dtype=torch.float32, device=x.device)
            quantize_into(x, layout, self.bits, q, scales)
            self._pack_into(q, out[:nd])
            if feedback:
                x.sub_(scale_rows_(q.view(1, -1), scales.view(1, -1), layout).view(-1))
            elif transmitted is not None:
                scale_rows_into(q.view(1, -1), scales.view(1, -1), layout, transmitted.view(1, -1))
        out[nd:nd + 4 * layout.num_groups].copy_(scales.view(torch.uint8))

    def decode_many(self, bufs, layout, out):
        if self.bits <= 8 and _kernel_ready(bufs, out):
            kernels.ops.codec_decode_many(bufs, *kernel_layout(layout), layout.num_groups, self.bits, out)
            return out
        nd = self.data_nbytes(out.shape[1])
        # a cast, then a float pass: faster than one mixed-dtype pass
        out.copy_(self._integers(bufs[:, :nd])[:, :out.shape[1]])
        return scale_rows_(out, self._scales(bufs, layout, nd), layout)

    def decode_mean(self, bufs, layout, size):
        if self.bits <= 8 and _kernel_ready(bufs):
            out = torch.empty(layout.numel, dtype=torch.float32)
            kernels.ops.codec_decode_mean(bufs, *kernel_layout(layout), layout.num_groups, self.bits, size, out)
            return out
        if bufs.device.type != "cpu" or torch.get_num_threads() > 1:  # whole-vector passes spread over threads
            return super().decode_mean(bufs, layout, size)
        nd = self.data_nbytes(layout.numel)
        scales = self._scales(bufs, layout, nd).numpy()
        return mean_of_payloads(self._integers(bufs[:, :nd]).numpy(), scales, layout, size,
                                torch.empty(layout.numel, dtype=torch.float32))

    @staticmethod
    def _scales(bufs: torch.Tensor, layout: Layout, nd: int) -> torch.Tensor:
        """The scales float32 [r, groups] of payloads uint8 [r, nbytes] whose data takes nd bytes."""
        scales = torch.empty(bufs.shape[0], 4 * layout.num_groups, dtype=torch.uint8, device=bufs.device)
        scales.copy_(bufs[:, nd:nd + 4 * layout.num_groups])
        return scales.view(torch.float32)

    def _pack_into(self, q: torch.Tensor, out: torch.Tensor) -> None:
        """q float32 [n] (integral) -> out uint8 [data_nbytes(n)]."""
        raise NotImplementedError

    def _integers(self, data: torch.Tensor) -> torch.Tensor:
        """Payload data uint8 [r, data_nbytes(n)] -> the integers [r, >= n] (a view where possible)."""
        raise NotImplementedError


@register
class Int16Compressor(_IntCompressor):
    name = "int16"
    bits = 16

    def _pack(self, q):
        return q.view(torch.uint8)

    def _unpack(self, data, numel):
        return data.clone().view(torch.int16)[:numel]

    def _pack_into(self, q, out):
        out.copy_(q.to(torch.int16).view(torch.uint8))

    def _integers(self, data):
        return data.clone().view(torch.int16)


@register
class Int8Compressor(_IntCompressor):
    name = "int8"
    bits = 8

    def _pack(self, q):
        return q.to(torch.int8).view(torch.uint8)

    def _unpack(self, data, numel):
        return data.view(torch.int8)[:numel]

    def _pack_into(self, q, out):
        out.view(torch.int8).copy_(q)

    def _integers(self, data):
        return data.view(torch.int8)


@register
class Int4Compressor(_IntCompressor):
    name = "int4"
    bits = 4

    def _pack(self, q):
        out = torch.empty(self.data_nbytes(q.numel()), dtype=torch.uint8, device=q.device)
        pack_int4_into(q, out)
        return out

    def _unpack(self, data, numel):
        return unpack_int4_into(data.view(1, -1), torch.empty(1, numel, dtype=torch.int16)).view(-1)

    def _pack_into(self, q, out):
        pack_int4_into(q, out)

    def _integers(self, data):
        return unpack_int4_int8(data)
