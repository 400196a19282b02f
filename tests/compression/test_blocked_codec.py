"""The INT8 / INT4 encoder that runs unit by unit (``quantize.units``): the same bytes and values
as whole-vector quantization wherever a unit edge falls, and error feedback in place."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dqrm_mpi.compression import get_compressor
from dqrm_mpi.compression.layout import Layout
from dqrm_mpi.compression.quantize import UNIT, units

INT_CODECS = ["int16", "int8", "int4"]


def _reference(c, x: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(wire bytes, decoded values) of compress / decompress with a per-element group index:
    whole-vector passes, no units."""
    groups = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes, dtype=torch.int64))
    ref = c.compress(x, groups, len(sizes))
    return c.to_bytes(ref), c.decompress(ref, groups)


def _encode(c, x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(c.nbytes(x.numel(), layout.num_groups), dtype=torch.uint8)
    transmitted = torch.empty_like(x)
    c.encode_into(x, layout, out, transmitted, torch.empty_like(x))
    return out, transmitted


@pytest.mark.parametrize("name", INT_CODECS)
@pytest.mark.parametrize("sizes", [
    [7000] * 20 + [13] * 5100 + [1],  # unit edges inside both blocks; one at an odd offset (INT4 nibbles)
    [UNIT + 3, 5, UNIT // 2 + 1] + [UNIT // 2] * 3,  # rows longer than a unit; a unit of exactly UNIT
    [0, 4, 0, 70_000, 0],  # empty groups around a row that is a unit of its own
], ids=["edges-inside-blocks", "long-rows", "empty-groups"])
def test_encode_across_unit_edges_equals_whole_vector_quantization(name, sizes):
    layout = Layout.from_sizes(sizes)
    assert len(units(layout)) > 1 or len(layout.blocks) > 1
    x = torch.randn(layout.numel, generator=torch.Generator().manual_seed(len(sizes)))
    x *= torch.logspace(-6, 2, layout.numel)  # groups of very different size
    out, transmitted = _encode(get_compressor(name), x.clone(), layout)
    wire, decoded = _reference(get_compressor(name), x, sizes)
    assert torch.equal(out, wire)
    assert torch.equal(transmitted, decoded)


@pytest.mark.parametrize("name", INT_CODECS)
@pytest.mark.parametrize("granularity", ["channel", "table"])
def test_encode_feedback_into_leaves_compensated_minus_decoded(name, granularity):
    """encode_feedback_into writes encode_into's bytes and turns x into x - the decoded values:
    unit by unit (channel scales) and through the whole-vector path (embedding rows grouped by
    table, with a row_group)."""
    c = get_compressor(name)
    gen = torch.Generator().manual_seed(3)
    if granularity == "channel":
        layout = Layout.from_sizes([512] * 300 + [13] * 40 + [1])
    else:
        layout = Layout.rows(600, 16, torch.sort(torch.randint(0, 5, (600,), generator=gen)).values, 6)
    x = torch.randn(layout.numel, generator=gen) * 1e-3
    out, transmitted = _encode(c, x.clone(), layout)
    residual = x.clone()
    msg = torch.empty_like(out)
    c.encode_feedback_into(residual, layout, msg, torch.empty_like(x))
    assert torch.equal(msg, out)
    assert torch.equal(residual, x - transmitted)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(INT_CODECS),
       sizes=st.lists(st.one_of(st.integers(0, 40), st.integers(1000, 9000), st.just(UNIT + 1)), min_size=1,
                      max_size=12),
       seed=st.integers(0, 2**31 - 1))
def test_encode_matches_whole_vector_quantization_for_any_group_sizes(name, sizes, seed):
    layout = Layout.from_sizes(sizes)
    x = torch.randn(layout.numel, generator=torch.Generator().manual_seed(seed)) * 10.0 ** (seed % 7 - 3)
    c = get_compressor(name)
    out, transmitted = _encode(c, x.clone(), layout)
    wire, decoded = _reference(c, x, sizes)
    assert torch.equal(out, wire)
    assert torch.equal(transmitted, decoded)
    residual = x.clone()
    c.encode_feedback_into(residual, layout, torch.empty_like(out))
    assert torch.equal(residual, x - decoded)
