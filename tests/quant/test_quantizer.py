"""Quantizer functions and QuantConfig validation."""
from __future__ import annotations

import pytest
import torch

from dqrm_mpi.quant.config import QuantConfig
from dqrm_mpi.quant.quantizer import (dequantize, fake_quant, qrange, quantize, row_scales, scale_from_max,
                                      tensor_scale)

ALL_BITS = list(range(2, 17))


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
    assert q.enabled and q.mlp_quant == "channel" and q.emb_scale == "table" and q.scale_period == 200
    assert QuantConfig(emb_bits=8).mlp_quant == "none"
    for bad, match in [(dict(emb_bits=1), "emb_bits must be an integer in"),
                       (dict(mlp_bits=17), "mlp_bits must be"),
                       (dict(emb_bits=4, emb_scale="col"), "emb_scale must be one of"),
                       (dict(mlp_quant="matrix"), "disagree"),
                       (dict(mlp_bits=4, mlp_quant="none"), "disagree"),
                       (dict(emb_bits=4, scale_period=0), "scale_period must be"),
                       (dict(pretrain_epochs=1), "needs something to quantize")]:
        with pytest.raises(ValueError, match=match):
            QuantConfig(**bad)
    assert QuantConfig.from_dict(q.to_dict()) == q


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_own_scale_path_equals_the_general_one(bits):
    from dqrm_mpi.quant.quantizer import fake_quant_own_scale

    w = (torch.randn(64, 37) * 0.3).requires_grad_(True)
    scale = row_scales(w, bits)
    assert torch.equal(fake_quant_own_scale(w, scale, bits), fake_quant(w, scale, bits))
    upstream = torch.randn(64, 37)
    fake_quant_own_scale(w, scale, bits).backward(upstream)
    assert torch.equal(w.grad, upstream)  # nothing is clamped with a scale taken from w itself
