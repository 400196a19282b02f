"""Symmetric uniform quantization with one scale per group (INT16, INT8, INT4).

scale_g = max|x| over group g / qmax, q = clamp(round(x / scale), -qmax - 1, qmax),
x_hat = q * scale.  The error per element is at most scale_g / 2.  INT4 packs two values
per byte (low nibble first, stored as q + 8).

Speed: groups are contiguous runs of elements (an output channel, a bias, an embedding row
or table), described by a ``Layout`` of 2-D blocks whose rows are groups.  Per-group absmax
is then ``amax(dim=1)`` on a view, and scales broadcast over rows, with no per-element
group index, scatter or gather.  ``encode_into`` / ``decode_many`` write into caller-owned
buffers and decode every rank's payload in one pass.
"""
from __future__ import annotations

import torch

from .base import ALLGATHER, Compressed, Compressor, register
from .layout import Layout

_TINY = torch.finfo(torch.float32).tiny


def group_absmax(x: torch.Tensor, groups: torch.Tensor | None, num_groups: int) -> torch.Tensor:
    """float32 [num_groups]: max |x| per group (0 for an empty group); any group order."""
    a = x.abs().to(torch.float32)
    if groups is None:
        return (a.max() if a.numel() else torch.zeros(())).reshape(1)
    out = torch.zeros(num_groups, dtype=torch.float32, device=x.device)
    return out.scatter_reduce_(0, groups, a, reduce="amax", include_self=True)


def quantize_into(x: torch.Tensor, layout: Layout, bits: int, q: torch.Tensor, scales: torch.Tensor) -> None:
    """x float32 [n] -> q float32 [n] (integral values in [-qmax-1, qmax]) and scales float32 [groups]."""
    qmax = 2 ** (bits - 1) - 1
    torch.abs(x, out=q)
    scales.zero_()
    for b in layout.blocks:
        if b.rows and b.cols:
            rowmax = q[b.lo:b.hi].view(b.rows, b.cols).amax(dim=1)
            if b.row_group is None:
                scales[b.g_lo:b.g_lo + b.rows] = rowmax
            else:
                scales.scatter_reduce_(0, b.row_group, rowmax, reduce="amax", include_self=True)
    scales.div_(qmax)
    safe = scales.clamp_min(_TINY)
    for b in layout.blocks:
        if b.rows and b.cols:
            torch.div(x[b.lo:b.hi].view(b.rows, b.cols), b.row_scales(safe).unsqueeze(-1),
                      out=q[b.lo:b.hi].view(b.rows, b.cols))
    q.round_().clamp_(-qmax - 1, qmax)


def scale_rows_(values: torch.Tensor, scales: torch.Tensor, layout: Layout) -> torch.Tensor:
    """In place: values float32 [r, n] (integers) *= their groups' scales [r, groups]."""
    r = values.shape[0]
    for b in layout.blocks:
        if b.rows and b.cols:
            values[:, b.lo:b.hi].view(r, b.rows, b.cols).mul_(b.row_scales(scales, dim=1).unsqueeze(-1))
    return values


def quantize(x: torch.Tensor, groups: torch.Tensor | None, num_groups: int,
             bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int16 [n], scales float32 [num_groups])."""
    x = x.to(torch.float32)
    layout = Layout.from_groups(groups, num_groups, x.numel())
    if layout is None:  # groups not contiguous: the general (slower) path
        qmax = 2 ** (bits - 1) - 1
        scales = group_absmax(x, groups, num_groups) / qmax
        q = torch.round(x / scales[groups].clamp_min(_TINY))
        return q.clamp_(-qmax - 1, qmax).to(torch.int16), scales
    q = torch.empty_like(x)
    scales = torch.empty(layout.num_groups, dtype=torch.float32, device=x.device)
    quantize_into(x, layout, bits, q, scales)
    return q.to(torch.int16), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    layout = Layout.from_groups(groups, scales.numel(), q.numel())
    if layout is None:
        return q.to(torch.float32) * scales[groups]
    return scale_rows_(q.to(torch.float32).reshape(1, -1), scales.reshape(1, -1), layout).reshape(-1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int [n] in [-8, 7] -> uint8 [ceil(n / 2)], two values per byte, low nibble first."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_full((1,), 8)])
    u = u.view(-1, 2)
    return u[:, 0] | (u[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [ceil(n / 2)] -> int16 [n]."""
    lo = (packed & 0x0F).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    return torch.stack([lo, hi], dim=1).reshape(-1)[:numel] - 8


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
        n, nd = x.numel(), self.data_nbytes(x.numel())
        q = work if work is not None else torch.empty(n, dtype=torch.float32, device=x.device)
        scales = torch.empty(layout.num_groups, dtype=torch.float32, device=x.device)
        quantize_into(x, layout, self.bits, q, scales)
        self._pack_into(q, out[:nd])
        out[nd:nd + 4 * layout.num_groups].copy_(scales.view(torch.uint8))
        if transmitted is not None:
            transmitted.copy_(q)
            scale_rows_(transmitted.view(1, -1), scales.view(1, -1), layout)

    def decode_many(self, bufs, layout, out):
        nd = self.data_nbytes(out.shape[1])
        scales = torch.empty(bufs.shape[0], 4 * layout.num_groups, dtype=torch.uint8)
        scales.copy_(bufs[:, nd:nd + 4 * layout.num_groups])
        scales = scales.view(torch.float32)
        self._unpack_into(bufs[:, :nd], out)
        return scale_rows_(out, scales, layout)

    def _pack_into(self, q: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError

    def _unpack_into(self, data: torch.Tensor, out: torch.Tensor) -> None:
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

    def _unpack_into(self, data, out):
        out.copy_(data.clone().view(torch.int16))


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

    def _unpack_into(self, data, out):
        out.copy_(data.view(torch.int8))


@register
class Int4Compressor(_IntCompressor):
    name = "int4"
    bits = 4

    def _pack(self, q):
        return pack_int4(q)

    def _unpack(self, data, numel):
        return unpack_int4(data, numel)

    def _pack_into(self, q, out):
        u = torch.empty(2 * out.numel(), dtype=torch.uint8, device=q.device)
        u[q.numel():] = 8
        torch.add(q, 8, out=q)          # q is scratch: integral floats in [0, 15]
        u[:q.numel()].copy_(q)
        u = u.view(-1, 2)
        torch.bitwise_left_shift(u[:, 1], 4, out=out)
        out.bitwise_or_(u[:, 0])
        q.sub_(8)

    def _unpack_into(self, data, out):
        r, n = out.shape
        u = torch.empty(r, data.shape[1], 2, dtype=torch.uint8, device=data.device)
        torch.bitwise_and(data, 0x0F, out=u[:, :, 0])
        torch.bitwise_right_shift(data, 4, out=u[:, :, 1])
        out.copy_(u.view(r, -1)[:, :n])
        out.sub_(8)
