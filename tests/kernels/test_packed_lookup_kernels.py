"""The packed-table lookup kernel (dqrm_mpi/csrc/packed_embedding.cpp) against
PackedEmbeddingTables' PyTorch path, bit for bit: INT8 / INT4 / INT2, per-table and per-row
scales, odd widths, int32 and int64 ids, one and two threads (the whole packed model: tests/serve)."""
import pytest
import torch

from dqrm_mpi import kernels
from dqrm_mpi.qcore import pack, quantize, row_scales, tensor_scale
from dqrm_mpi.quant.packed import PackedEmbeddingTables

from .bits import same_bits

pytestmark = pytest.mark.skipif(not kernels.BUILT, reason="CPU kernels not built")


def _tables(bits: int, dim: int, per_row: bool, rows=(1, 7, 300, 33)) -> PackedEmbeddingTables:
    g = torch.Generator().manual_seed(bits * 100 + dim)
    packed, scales = [], []
    for n in rows:
        w = torch.randn(n, dim, generator=g) * 0.1
        w[0] = 0.0  # an all-zero row (the smallest scale)
        s = row_scales(w, bits) if per_row else tensor_scale(w, bits)
        packed.append(pack(quantize(w, s, bits), bits))
        scales.append(s)
    return PackedEmbeddingTables(packed, scales, bits, dim, per_row)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [16, 5])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_lookup_kernel_gives_the_pytorch_paths_bits(bits, dim, per_row, threads, set_threads):
    set_threads(threads)
    tables = _tables(bits, dim, per_row)
    cards = torch.tensor([1, 7, 300, 33])
    ids = (torch.rand(517, 4, generator=torch.Generator().manual_seed(3)) * cards).long()
    ids[0] = cards - 1  # every table's last row
    got = tables(ids)
    with kernels.disabled():
        want = tables(ids)
    assert same_bits(got, want)
    assert same_bits(tables(ids.int()), want)


def test_lookup_kernel_refuses_ids_outside_a_table():
    tables = _tables(4, 16, False)
    with pytest.raises(IndexError, match="id 7 of table 1"):
        tables(torch.tensor([[0, 7, 0, 0]]))
