"""The quantization core (bit range, scales, quantize / fake quant) and QuantConfig validation."""
from __future__ import annotations

import pytest
import torch

from dqrm_mpi.qcore import (EPS, MAX_BITS, MIN_BITS, check_bits, dequantize, fake_quant, fake_quant_own_scale,
                            group_scales, qrange, quantize, row_scales, scale_from_max, tensor_scale)
from dqrm_mpi.quant.config import QuantConfig

ALL_BITS = list(range(MIN_BITS, MAX_BITS + 1))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_round_trip_error_at_most_half_a_scale(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(300, 17, generator=gen) * 0.05
    scale = tensor_scale(w, bits)
    assert torch.allclose(scale, w.abs().max() / (2 ** (bits - 1) - 1))
    ulp = 2 * torch.finfo(torch.float32).eps * float(w.abs().max())  # float32 rounding of q * scale
    err = (fake_quant(w, scale, bits) - w).abs().max()
    assert err <= scale[0] / 2 + ulp
    # rowwise: every row within half of its own scale
    rs = row_scales(w, bits)
    err_rows = (fake_quant(w, rs, bits) - w).abs().amax(dim=1)
    assert torch.all(err_rows <= rs / 2 + ulp)
    # the integers behind fake_quant are in range and reproduce it exactly
    q = quantize(w, rs, bits)
    qmin, qmax = qrange(bits)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax and int(q.abs().max()) == qmax
    assert torch.equal(dequantize(q, rs), fake_quant(w, rs, bits))


def test_qrange_and_scale_formula():
    assert qrange(4) == (-8, 7) and qrange(2) == (-2, 1) and qrange(16) == (-32768, 32767)
    assert float(scale_from_max(torch.tensor([7.0]), 4)) == 1.0
    with pytest.raises(ValueError, match="bits must be an integer in"):
        qrange(1)
    with pytest.raises(ValueError, match="bits must be an integer in"):
        qrange(17)
    # an all-zero tensor quantizes to zeros (no division by zero)
    z = torch.zeros(3, 4)
    assert torch.equal(fake_quant(z, tensor_scale(z, 4), 4), z)
    assert float(tensor_scale(z, 4)) == EPS and torch.equal(row_scales(z, 4), torch.full((3,), EPS))
    for bad in (MIN_BITS - 1, MAX_BITS + 1, 4.0, True, None):
        with pytest.raises(ValueError, match=r"act_bits must be an integer in \[2, 16\]"):
            check_bits(bad, "act_bits")
    assert check_bits(MAX_BITS) == MAX_BITS


def test_group_scales_equal_row_scales_for_contiguous_groups_and_any_order():
    w = torch.randn(6, 5)
    groups = torch.arange(6).repeat_interleave(5)
    assert torch.equal(group_scales(w.reshape(-1), groups, 6, 8), row_scales(w, 8))
    perm = torch.randperm(30)
    assert torch.equal(group_scales(w.reshape(-1)[perm], groups[perm], 6, 8), row_scales(w, 8))
    assert float(group_scales(torch.ones(2), torch.zeros(2, dtype=torch.int64), 2, 4)[1]) == EPS  # empty group


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_ste_gradient_is_identity_inside_the_range_and_zero_outside(bits):
    qmin, qmax = qrange(bits)
    scale = torch.tensor([0.1])
    inside = torch.linspace(qmin * 0.1 + 1e-3, qmax * 0.1 - 1e-3, 50)
    outside = torch.tensor([(qmax + 3) * 0.1, (qmin - 3) * 0.1])
    x = torch.cat([inside, outside]).requires_grad_(True)
    upstream = torch.randn(x.shape[0])
    fake_quant(x, scale, bits).backward(upstream)
    assert torch.equal(x.grad[:50], upstream[:50])  # identity inside
    assert torch.equal(x.grad[50:], torch.zeros(2))  # clamped values get no gradient
    # per-channel path: the same rule
    x2 = torch.cat([inside, outside]).reshape(1, -1).repeat(3, 1).requires_grad_(True)
    fake_quant(x2, torch.full((3,), 0.1), bits).sum().backward()
    assert torch.equal(x2.grad[:, :50], torch.ones(3, 50)) and torch.equal(x2.grad[:, 50:], torch.zeros(3, 2))


def test_bad_scale_shape_is_an_error():
    with pytest.raises(ValueError, match="scale must have shape"):
        fake_quant(torch.randn(4, 3), torch.ones(3), 4)


def test_quant_config_validation_and_defaults():
    assert not QuantConfig().enabled
    q = QuantConfig(emb_bits=4, mlp_bits=4)
    assert q.enabled and q.mlp_scale == "channel" and q.emb_scale == "table" and q.scale_period == 200
    assert QuantConfig(emb_bits=8).mlp_scale is None
    for bad, match in [(dict(emb_bits=1), "emb_bits must be an integer in"),
                       (dict(mlp_bits=17), "mlp_bits must be"),
                       (dict(emb_bits=4, emb_scale="col"), "emb_scale must be one of"),
                       (dict(emb_bits=4, emb_scale="rowwise"), "emb_scale must be one of"),
                       (dict(mlp_bits=4, mlp_scale="row"), "mlp_scale must be one of"),
                       (dict(mlp_scale="tensor"), "disagree"),
                       (dict(emb_bits=4, scale_period=0), "scale_period must be"),
                       (dict(pretrain_epochs=1), "needs something to quantize")]:
        with pytest.raises(ValueError, match=match):
            QuantConfig(**bad)
    assert QuantConfig.from_dict(q.to_dict()) == q


def test_quant_config_reads_the_older_spellings_of_saved_dicts():
    old = {"emb_bits": 4, "emb_scale": "rowwise", "scale_period": 200, "mlp_bits": 4, "mlp_quant": "matrix",
           "act_bits": None, "pretrain_epochs": 0}
    assert QuantConfig.from_dict(old) == QuantConfig(emb_bits=4, emb_scale="row", mlp_bits=4, mlp_scale="tensor")
    assert QuantConfig.from_dict({"emb_bits": 8, "emb_scale": "table", "mlp_quant": "none"}) == QuantConfig(emb_bits=8)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("per_row", [True, False])
def test_own_scale_path_equals_the_general_one(bits, per_row):
    w = (torch.randn(64, 37) * 0.3).requires_grad_(True)
    w.data[5] = 0.0  # an all-zero row: scale EPS, zeros out
    scale = row_scales(w, bits) if per_row else tensor_scale(w, bits)
    written = torch.full(scale.shape, -1.0)
    assert torch.equal(fake_quant_own_scale(w, bits, per_row, written), fake_quant(w, scale, bits))
    assert torch.equal(written, scale)
    upstream = torch.randn(64, 37)
    fake_quant_own_scale(w, bits, per_row).backward(upstream)
    assert torch.equal(w.grad, upstream)  # nothing is clamped with a scale taken from w itself
    if per_row:
        with pytest.raises(ValueError, match="2-D"):
            fake_quant_own_scale(torch.randn(2, 3, 4), bits, per_row)
