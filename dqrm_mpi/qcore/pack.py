"""Bit packing of signed b-bit integers (2 <= b <= 16) along the last dimension.

Each value q in [-2^(b-1), 2^(b-1) - 1] is stored as u = q + 2^(b-1) in b bits,
little-endian: value k of a row occupies bits [k*b, (k+1)*b) of the row's byte string,
counting from bit 0 of byte 0.  INT4 holds two values per byte (the first in the low
nibble), INT2 four.  Every row (last dimension) starts on a byte boundary and is padded
with zero bits to ceil(n * b / 8) bytes, so a row can be read on its own (lookup).

``pack`` / ``unpack`` take any width and shape.  ``pack_int4_into`` / ``unpack_int4_into``
write the same INT4 bytes for one flat row into caller-owned buffers (the gradient codecs'
hot path), two values at a time through int16 views of the bytes, without float temporaries.
"""
from __future__ import annotations

import sys

import torch

from .uniform import qrange

_LITTLE_ENDIAN = sys.byteorder == "little"


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one packed row of n b-bit values takes."""
    qrange(bits)
    return (n * bits + 7) // 8


def pack_int4_into(q: torch.Tensor, out: torch.Tensor) -> None:
    """q [n] (integral values in [-8, 7], any dtype; not modified) -> out uint8 [ceil(n / 2)],
    the bytes of ``pack(q.reshape(1, -1), 4)``."""
    n = q.numel()
    u = torch.empty(2 * out.numel(), dtype=torch.uint8, device=q.device)
    u[:n].view(torch.int8).copy_(q.reshape(-1))
    u.add_(8)  # q + 8 in [0, 15] (uint8 arithmetic wraps -8..-1 to 0..7)
    u[n:] = 0  # the padding nibble of an odd n
    if _LITTLE_ENDIAN:  # two values at a time: int16 lo + 256 hi -> lo | hi << 4 in its low byte
        pairs = u.view(torch.int16)
        out.copy_(pairs.bitwise_right_shift(4).bitwise_or_(pairs))  # int16 -> uint8 keeps the low byte
    else:
        u = u.view(-1, 2)
        torch.bitwise_left_shift(u[:, 1], 4, out=out)
        out.bitwise_or_(u[:, 0])


def unpack_int4_into(packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """packed uint8 [r, ceil(n / 2)] (one ``pack_int4_into`` row each) -> out [r, n] (any dtype),
    the signed values."""
    r, n = out.shape
    out.copy_(unpack_int4_int8(packed)[:, :n])
    return out


def unpack_int4_int8(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 [r, m] (rows of ``pack_int4_into``) -> int8 [r, 2 m], the signed values
    (each row's last value is padding when its n is odd)."""
    r, m = packed.shape
    if _LITTLE_ENDIAN:  # byte b -> the int16 (b & 15) + 256 (b >> 4): two values at a time
        pairs = packed.to(torch.int16)
        pairs.bitwise_or_(pairs.bitwise_left_shift(4)).bitwise_and_(0x0F0F)
        u = pairs.view(torch.uint8)
    else:
        u = torch.empty(r, m, 2, dtype=torch.uint8, device=packed.device)
        torch.bitwise_and(packed, 0x0F, out=u[:, :, 0])
        torch.bitwise_right_shift(packed, 4, out=u[:, :, 1])
        u = u.view(r, 2 * m)
    return u.sub_(8).view(torch.int8)  # stored as q + 8: uint8 arithmetic wraps to q's two's complement


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q int [..., n] -> uint8 [..., ceil(n*b/8)]; ValueError if a value is out of range."""
    qmin, qmax = qrange(bits)
    if q.is_floating_point():
        raise TypeError(f"pack takes integers, got {q.dtype}")
    n = q.shape[-1]
    if q.numel() and (int(q.min()) < qmin or int(q.max()) > qmax):
        raise ValueError(f"values outside [{qmin}, {qmax}] cannot be packed in {bits} bits")
    u = q.to(torch.int32) - qmin  # [..., n] in [0, 2^b)
    lead = q.shape[:-1]
    if bits == 16:
        return torch.stack([u & 0xFF, u >> 8], dim=-1).reshape(*lead, 2 * n).to(torch.uint8)
    if 8 % bits == 0:  # 2, 4, 8: a whole number of values per byte
        per = 8 // bits
        u = torch.nn.functional.pad(u, (0, -n % per)).reshape(*lead, -1, per)
        shifts = torch.arange(per, dtype=torch.int32, device=q.device) * bits
        return (u << shifts).sum(dim=-1).to(torch.uint8)
    # Any other width: through a bit array [..., n*b] padded to whole bytes.
    shifts = torch.arange(bits, dtype=torch.int32, device=q.device)
    bit_array = ((u.unsqueeze(-1) >> shifts) & 1).reshape(*lead, n * bits)
    bit_array = torch.nn.functional.pad(bit_array, (0, -(n * bits) % 8)).reshape(*lead, -1, 8)
    return (bit_array << torch.arange(8, dtype=torch.int32, device=q.device)).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 [..., ceil(n*b/8)] -> int16 [..., n] (the inverse of ``pack``)."""
    qmin, _ = qrange(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack takes uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_row_bytes(n, bits):
        raise ValueError(f"{n} values of {bits} bits take {packed_row_bytes(n, bits)} bytes per row, "
                         f"got {packed.shape[-1]}")
    p = packed.to(torch.int32)
    lead = packed.shape[:-1]
    if bits == 16:
        pairs = p.reshape(*lead, n, 2)
        u = pairs[..., 0] | (pairs[..., 1] << 8)
    elif 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
        u = ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*lead, -1)[..., :n]
    else:
        bit_array = ((p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32, device=packed.device)) & 1)
        bit_array = bit_array.reshape(*lead, -1)[..., :n * bits].reshape(*lead, n, bits)
        u = (bit_array << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(dim=-1)
    return (u + qmin).to(torch.int16)
