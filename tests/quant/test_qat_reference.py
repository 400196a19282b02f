"""QAT training is bit for bit what it was before the one-node fake quant (commit 4a17e02): a frozen
copy of that commit's fake-quant forward passes (below, torch only) trains a twin model, and
after some steps every parameter and buffer of the two models is equal."""
from __future__ import annotations

import types

import pytest
import torch
from torch.nn import functional as F

from dqrm_mpi.model import DLRM, model_config_from_preset
from dqrm_mpi.quant import QuantConfig, prepare_qat

CARDS = [40, 30, 25] + [12] * 23
TINY = torch.finfo(torch.float32).tiny


# ---- frozen reference: the arithmetic of dqrm_mpi/qcore/uniform.py and quant/qat.py at 4a17e02 ----
def _ref_qmax(bits):
    return (1 << (bits - 1)) - 1


def _ref_row_scales(w, bits):
    w = w.detach()
    return (torch.maximum(w.amax(dim=1), -w.amin(dim=1)).float() / _ref_qmax(bits)).clamp_min(TINY)


def _ref_tensor_scale(w, bits):
    lo, hi = torch.aminmax(w.detach())
    return (torch.maximum(hi, -lo).reshape(1).float() / _ref_qmax(bits)).clamp_min(TINY)


def _ref_fake_quant_tensor(x, scale, bits):
    zero = torch.zeros((), dtype=torch.int32)
    return torch.fake_quantize_per_tensor_affine(x, scale.detach().reshape(()), zero, -_ref_qmax(bits) - 1,
                                                 _ref_qmax(bits))


class _RefOwnScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        shape = (-1,) + (1,) * (x.dim() - 1)
        return torch.mul(x, (1.0 / scale).reshape(shape)).round_().mul_(scale.reshape(shape))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _ref_linear_forward(self, x):
    if self.a_bits and self.training:
        observed = bool(self.act_scale[0] > 0)
        batch_scale = _ref_tensor_scale(x, self.a_bits)
        scale = self.act_scale if observed else batch_scale
        x_q = _ref_fake_quant_tensor(x, scale, self.a_bits)
        with torch.no_grad():
            self.act_scale.copy_(batch_scale if not observed else (1 - 0.1) * self.act_scale + 0.1 * batch_scale)
        x = x_q
    elif self.a_bits:
        x = _ref_fake_quant_tensor(x, self.act_scale, self.a_bits)
    w = self.weight
    if self.w_bits:
        scale = _ref_row_scales(w, self.w_bits) if self.is_per_channel else _ref_tensor_scale(w, self.w_bits)
        with torch.no_grad():
            self.weight_scale.copy_(scale)
        w = (_RefOwnScale.apply(w, scale.detach()) if self.is_per_channel
             else _ref_fake_quant_tensor(w, scale, self.w_bits))
    return F.linear(x, w, self.bias)


def _ref_embedding_forward(self, rows):
    if self.is_rowwise:
        flat = rows.reshape(-1, rows.shape[-1])
        return _RefOwnScale.apply(flat, _ref_row_scales(flat, self.num_bits)).view(rows.shape)
    detached = rows.detach()
    scales = self.scales.view(1, -1, 1)
    quantized = torch.round(detached * (1.0 / scales)).clamp_(-_ref_qmax(self.num_bits) - 1,
                                                              _ref_qmax(self.num_bits)).mul_(scales)
    return rows + (quantized - detached)
# ---- end of the frozen reference ----


def _prepared(config, reference):
    torch.manual_seed(0)
    model = DLRM(model_config_from_preset("tiny", CARDS))
    qat = prepare_qat(model, config)
    if reference:
        for layer in qat.linears:
            layer.forward = types.MethodType(_ref_linear_forward, layer)
        if qat.emb is not None:
            qat.emb.forward = types.MethodType(_ref_embedding_forward, qat.emb)
    return model, qat


def _train(model, qat, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        dense = torch.rand(32, 13, generator=gen)
        sparse = torch.stack([torch.randint(0, c, (32,), generator=gen) for c in CARDS], dim=1)
        label = (torch.rand(32, generator=gen) < 0.3).float()
        qat.on_step(step)
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(dense, sparse), label).backward()
        opt.step()
    return model


@pytest.mark.parametrize("config", [
    QuantConfig(emb_bits=4, mlp_bits=4, mlp_scale="channel", scale_period=3),
    QuantConfig(emb_bits=8, mlp_bits=8, mlp_scale="channel", scale_period=3),
    QuantConfig(emb_bits=4, emb_scale="row", mlp_bits=4, mlp_scale="tensor"),
    QuantConfig(emb_bits=8, emb_scale="row", mlp_bits=8, mlp_scale="tensor"),
    QuantConfig(emb_bits=4, emb_scale="row", mlp_bits=4, mlp_scale="channel", act_bits=8),
    QuantConfig(emb_bits=8, mlp_bits=4, mlp_scale="tensor", scale_period=2, act_bits=8),
], ids=lambda c: f"emb{c.emb_bits}-{c.emb_scale}-mlp{c.mlp_bits}-{c.mlp_scale}-act{c.act_bits}")
def test_training_is_bit_identical_to_the_frozen_reference(config):
    steps = 7
    new = _train(*_prepared(config, reference=False), steps)
    ref = _train(*_prepared(config, reference=True), steps)
    start = _prepared(config, reference=False)[0].state_dict()
    new_state, ref_state = new.state_dict(), ref.state_dict()
    assert new_state.keys() == ref_state.keys()
    for key, value in new_state.items():
        assert torch.equal(value, ref_state[key]), key
    assert not torch.equal(new_state["top.layers.0.weight"], start["top.layers.0.weight"])  # it trained
    new.eval(), ref.eval()
    dense, sparse = torch.rand(8, 13), torch.stack([torch.randint(0, c, (8,)) for c in CARDS], dim=1)
    with torch.no_grad():
        assert torch.equal(new(dense, sparse), ref(dense, sparse))


@pytest.mark.parametrize("mlp_scale", ["channel", "tensor"])
@pytest.mark.parametrize("bits", [4, 8])
def test_near_ties_and_clamped_rows_round_as_the_frozen_reference(bits, mlp_scale):
    """Values at about (k + 1/2) * scale, where x * (1/scale) and x / scale can round apart, and
    embedding rows far beyond their table's scale (clamped)."""
    config = QuantConfig(emb_bits=bits, mlp_bits=bits, mlp_scale=mlp_scale, scale_period=1000)
    models = {name: _prepared(config, reference=name == "ref") for name in ("new", "ref")}
    gen = torch.Generator().manual_seed(0)  # seed 0: the one tensor-mode scale has splitting ties too
    qmax = _ref_qmax(bits)
    # column 0 holds each row's max |w| (one for all rows per tensor): the scale is row_max / qmax
    row_max = qmax * torch.rand(32 if mlp_scale == "channel" else 1, 1, generator=gen).expand(32, 1)
    scale = row_max / qmax
    width = models["new"][0].top.layers[0].in_features  # the tiny top MLP's first layer: [32, width]
    halves = (torch.arange(-qmax, qmax).float() + 0.5).repeat(width)[:width - 1]  # the grid's half-way points
    jitter = 1 + (torch.randint(-4, 5, (32, width - 1), generator=gen).float() * torch.finfo(torch.float32).eps)
    ties = torch.cat([row_max, halves * jitter * scale], dim=1)
    for model, qat in models.values():
        with torch.no_grad():
            model.top.layers[0].weight.copy_(ties)
        qat.on_step(0)
        with torch.no_grad():
            model.embeddings.table(2)[:5] *= 40  # far beyond table 2's scale
    x = torch.rand(16, width)
    sparse = torch.randint(0, 5, (16, len(CARDS)))
    new, ref = models["new"][0], models["ref"][0]
    assert torch.equal(new.top.layers[0](x), ref.top.layers[0](x))
    assert torch.equal(new.embeddings(sparse), ref.embeddings(sparse))
    fast, slow = torch.mul(ties, torch.reciprocal(scale)).round(), torch.div(ties, scale).round()
    assert not torch.equal(fast, slow)  # the data has ties that a different rounding path would break
