"""Bit packing round trips and byte layout."""
from __future__ import annotations

import pytest
import torch

from dqrm_mpi.qcore import pack, pack_int4_into, packed_row_bytes, unpack, unpack_int4_into


@pytest.mark.parametrize("bits", list(range(2, 17)))
@pytest.mark.parametrize("n", [1, 3, 7, 16, 17, 33])
def test_pack_unpack_round_trip(bits, n):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    gen = torch.Generator().manual_seed(bits * 100 + n)
    q = torch.randint(lo, hi + 1, (9, n), generator=gen)
    q[0, 0], q[-1, -1] = lo, hi  # both ends of the range
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (9, (n * bits + 7) // 8)
    assert torch.equal(unpack(packed, bits, n).long(), q)


def test_int4_two_per_byte_and_int2_four_per_byte():
    assert packed_row_bytes(16, 4) == 8 and packed_row_bytes(16, 2) == 4 and packed_row_bytes(15, 4) == 8
    # INT4: first value in the low nibble, stored offset by 8
    assert pack(torch.tensor([[-8, 7]]), 4).tolist() == [[0xF0]]
    # INT2: 1, -1, 0, -2 -> 3, 1, 2, 0 at bits 0, 2, 4, 6
    assert pack(torch.tensor([[1, -1, 0, -2]]), 2).tolist() == [[3 | 1 << 2 | 2 << 4]]
    # INT16 little-endian
    assert pack(torch.tensor([[-32768, 32767]]), 16).tolist() == [[0, 0, 0xFF, 0xFF]]


def test_pack_rejects_out_of_range_and_floats():
    with pytest.raises(ValueError, match="outside"):
        pack(torch.tensor([[8]]), 4)
    with pytest.raises(TypeError):
        pack(torch.tensor([[1.0]]), 4)
    with pytest.raises(ValueError, match="bytes per row"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_int4_into_buffers_writes_the_bytes_of_pack(n):
    """The codecs' in-buffer INT4 path and the export's pack agree byte for byte, and invert."""
    q = torch.randint(-8, 8, (n,), generator=torch.Generator().manual_seed(n))
    expected = pack(q.reshape(1, -1), 4).reshape(-1)
    for source in (q.clone(), q.float()):
        out = torch.full((packed_row_bytes(n, 4),), 0xAA, dtype=torch.uint8)
        pack_int4_into(source, out)
        assert torch.equal(out, expected)
        assert torch.equal(source, q.to(source.dtype))  # a float input is used as scratch and restored
    decoded = unpack_int4_into(torch.stack([expected, expected]), torch.empty(2, n))
    assert torch.equal(decoded, q.float().expand(2, n))
