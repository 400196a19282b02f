"""Symmetric uniform quantization with one scale per group (INT16, INT8, INT4).

scale_g = max|x| over group g / qmax, q = clamp(round(x / scale), -qmax - 1, qmax),
x_hat = q * scale (``qcore``'s bit range and scale rule).  The error per element is at most
scale_g / 2.  INT16 and INT8 travel as two's-complement integers, INT4 as ``qcore``'s packed
INT4 (two values per byte, low nibble first, stored as q + 8).

Speed: groups are contiguous runs of elements (an output channel, a bias, an embedding row
or table), described by a ``Layout`` of 2-D blocks whose rows are groups.  Per-group absmax
is then ``amax(dim=1)`` on a view, and scales broadcast over rows, with no per-element
group index, scatter or gather.  ``encode_into`` / ``decode_many`` write into caller-owned
buffers and decode every rank's payload in one pass.  Each whole-vector pass costs about as
much as the memory it moves, so the encoder makes as few as it can: |x|, x / scale, round,
the cast into the payload, and q * scale straight into the transmitted values (no clamp,
no copy of q); INT4 packs and unpacks through int16 views of the bytes (``qcore.pack``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..qcore import group_scales, pack_int4_into, qrange, scale_from_max_, unpack_int4_into
from ..qcore.pack import unpack_int4_int8
from .base import ALLGATHER, Compressed, Compressor, register
from .layout import Layout

UNIT = 16_384  # values per unit of ``mean_of_payloads`` (64 KiB of float32 scratch)


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
    for b in layout.blocks:
        if not (b.rows and b.cols):
            continue
        rs = scales[:, b.g_lo:b.g_lo + b.rows] if b.row_group is None else scales[:, b.row_group.numpy()]
        step = max(1, UNIT // b.cols)
        for r0 in range(0, b.rows, step):
            r1 = min(r0 + step, b.rows)
            lo, hi, shape = b.lo + r0 * b.cols, b.lo + r1 * b.cols, (r1 - r0, b.cols)
            acc, t = on[lo:hi].reshape(shape), scratch[:hi - lo].reshape(shape)
            np.copyto(acc, q[0, lo:hi].reshape(shape))
            np.multiply(acc, rs[0, r0:r1, None], out=acc)
            for r in range(1, q.shape[0]):
                np.copyto(t, q[r, lo:hi].reshape(shape))
                np.multiply(t, rs[r, r0:r1, None], out=t)
                np.add(acc, t, out=acc)
            np.divide(acc, np.float32(size), out=acc)
    return out


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
            scale_rows_into(q.view(1, -1), scales.view(1, -1), layout, transmitted.view(1, -1))

    def decode_many(self, bufs, layout, out):
        nd = self.data_nbytes(out.shape[1])
        # a cast, then a float pass: faster than one mixed-dtype pass
        out.copy_(self._integers(bufs[:, :nd])[:, :out.shape[1]])
        return scale_rows_(out, self._scales(bufs, layout, nd), layout)

    def decode_mean(self, bufs, layout, size):
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
