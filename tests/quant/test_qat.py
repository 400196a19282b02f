"""QAT on a DLRM, in process: which rows are quantized, when scales are refreshed,
pretraining, MLP quantization, and state_dict round trips."""
from __future__ import annotations

import io

import pytest
import torch

from dqrm_mpi.model import DLRM, model_config_from_preset
from dqrm_mpi.quant import EmbeddingFakeQuant, QuantConfig, QuantLinear, prepare_qat
from dqrm_mpi.qcore import fake_quant, row_scales, tensor_scale

CARDS = [40, 30, 25] + [12] * 23


def _model(seed=0):
    torch.manual_seed(seed)
    return DLRM(model_config_from_preset("tiny", CARDS))


def _batch(seed, n=16):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.rand(n, 13, generator=gen)
    sparse = torch.stack([torch.randint(0, c, (n,), generator=gen) for c in CARDS], dim=1)
    label = (torch.rand(n, generator=gen) < 0.3).float()
    return dense, sparse, label


def _sgd_steps(model, qat, steps, lr=0.5, start=0, on_step_hook=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(start, start + steps):
        qat.on_step(step)
        if on_step_hook:
            on_step_hook(step)
        dense, sparse, label = _batch(step)
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), label).backward()
        opt.step()


def test_only_batch_rows_are_fake_quantized_and_master_table_stays_fp32():
    model = _model()
    qat = prepare_qat(model, QuantConfig(emb_bits=4))
    qat.on_step(0)
    w0 = model.embeddings.table(0)
    before = w0.detach().clone()
    _, sparse, _ = _batch(1)
    out = model.embeddings(sparse)  # [B, 26, d]
    scale = tensor_scale(before, 4)
    assert torch.equal(out[:, 0], fake_quant(before[sparse[:, 0]], scale, 4))
    assert not torch.equal(out[:, 0], before[sparse[:, 0]])  # really quantized
    assert torch.equal(w0.detach(), before)  # the master table is untouched
    out.sum().backward()
    g = model.embeddings.weight.grad.coalesce()  # table 0 is the flat table's first rows
    assert g.is_sparse and set(g.indices()[0].tolist()) == set((sparse + model.embeddings.offsets).view(-1).tolist())


def test_full_table_scale_pass_runs_exactly_at_multiples_of_the_period():
    model = _model()
    qat = prepare_qat(model, QuantConfig(emb_bits=4, scale_period=10))
    emb = model.embeddings.row_transform
    seen = []
    real_refresh = emb.refresh
    emb.refresh = lambda weights, step: (seen.append(step), real_refresh(weights, step))[1]  # count the passes
    history = []

    def record(step):
        w = model.embeddings.table(2).detach()
        history.append((step, emb.scales[2].item(), tensor_scale(w, 4).item()))

    _sgd_steps(model, qat, 25, on_step_hook=record)
    assert seen == [0, 10, 20]
    assert qat.table_passes == 3 and int(emb.refreshes) == 3 and int(emb.last_refresh_step) == 20
    for step, stored, current in history:
        if step % 10 == 0:
            assert stored == pytest.approx(current, rel=1e-6)  # refreshed from the table as it is now
        else:
            assert stored == history[step - step % 10][1]  # unchanged between refreshes
    assert any(abs(s - c) > 1e-9 for _, s, c in history)  # the table moved between refreshes


def test_period_one_refreshes_every_step_and_rowwise_never_passes_over_tables():
    model = _model()
    qat = prepare_qat(model, QuantConfig(emb_bits=8, scale_period=1))
    _sgd_steps(model, qat, 5)
    assert qat.table_passes == 5
    model = _model()
    qat = prepare_qat(model, QuantConfig(emb_bits=4, emb_scale="row"))
    _sgd_steps(model, qat, 5)
    assert qat.table_passes == 0
    _, sparse, _ = _batch(3)
    rows = model.embeddings.table(1).detach()[sparse[:, 1]]
    assert torch.equal(model.embeddings(sparse)[:, 1], fake_quant(rows, row_scales(rows, 4), 4))


def test_pretrain_epochs_train_fp32_then_switch_quantization_on():
    model, ref = _model(), _model()
    qat = prepare_qat(model, QuantConfig(emb_bits=4, mlp_bits=4, pretrain_epochs=1))
    dense, sparse, _ = _batch(5)
    qat.on_epoch(0)
    qat.on_step(0)
    assert not qat.enabled and qat.table_passes == 0
    assert torch.equal(model(dense, sparse), ref(dense, sparse))  # FP32 during pretraining
    qat.on_epoch(1)
    qat.on_step(7)  # not a multiple of the period: refreshed because QAT just started
    assert qat.enabled and qat.table_passes == 1
    assert not torch.allclose(model(dense, sparse), ref(dense, sparse))


@pytest.mark.parametrize("mode,shape", [("channel", (32,)), ("tensor", (1,))])
def test_mlp_weights_quantized_per_channel_or_matrix(mode, shape):
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    qat = prepare_qat(model, QuantConfig(mlp_bits=4, mlp_scale=mode))
    assert [n for n, _ in model.named_parameters()] == names  # optimizer / gradient sync unaffected
    layer = model.bottom.layers[0]
    assert isinstance(layer, QuantLinear) and len(qat.linears) == 4
    x = torch.rand(5, 13)
    scale = row_scales(layer.weight, 4) if mode == "channel" else tensor_scale(layer.weight, 4)
    expected = torch.nn.functional.linear(x, fake_quant(layer.weight, scale, 4), layer.bias)
    assert torch.equal(layer(x), expected)
    assert layer.weight_scale.shape == shape and torch.equal(layer.weight_scale, scale)
    # bias stays FP32; the weight gets the STE gradient
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None


def test_activation_quantization_uses_a_running_scale_frozen_in_eval():
    model = _model()
    qat = prepare_qat(model, QuantConfig(act_bits=8))
    _sgd_steps(model, qat, 3)
    scales = [s.item() for s in qat.activation_scales()]
    assert len(scales) == 4 and all(s > 0 for s in scales)
    model.eval()
    dense, sparse, _ = _batch(9)
    model(dense, sparse)
    assert [s.item() for s in qat.activation_scales()] == scales  # frozen in eval


def test_state_dict_round_trip_keeps_scales_counters_and_modes():
    model = _model()
    config = QuantConfig(emb_bits=4, mlp_bits=4, act_bits=8, scale_period=3)
    qat = prepare_qat(model, config)
    _sgd_steps(model, qat, 7)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    restored = _model(seed=1)
    restored_qat = prepare_qat(restored, config)
    restored.load_state_dict(torch.load(buf))
    emb, emb2 = model.embeddings.row_transform, restored.embeddings.row_transform
    assert torch.equal(emb.scales, emb2.scales) and restored_qat.table_passes == qat.table_passes == 3
    assert int(emb2.last_refresh_step) == 6 and emb2._scales_valid
    for a, b in zip(qat.activation_scales(), restored_qat.activation_scales()):
        assert torch.equal(a, b)
    model.eval(), restored.eval()
    dense, sparse, _ = _batch(11)
    assert torch.equal(model(dense, sparse), restored(dense, sparse))
    # a model prepared with other bit widths refuses the state
    other = _model()
    prepare_qat(other, QuantConfig(emb_bits=8, mlp_bits=4, act_bits=8, scale_period=3))
    with pytest.raises(RuntimeError, match="quantization settings differ"):
        other.load_state_dict(model.state_dict())


def test_forward_before_any_scale_pass_is_an_error_and_double_prepare_too():
    model = _model()
    prepare_qat(model, QuantConfig(emb_bits=4))
    _, sparse, _ = _batch(0)
    with pytest.raises(RuntimeError, match="never computed"):
        model.embeddings(sparse)
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat(model, QuantConfig(emb_bits=4))
    assert isinstance(model.embeddings.row_transform, EmbeddingFakeQuant)


def test_rows_outgrowing_a_stale_table_scale_are_clamped_but_keep_their_gradient():
    model = _model()
    qat = prepare_qat(model, QuantConfig(emb_bits=4, scale_period=1000))
    qat.on_step(0)
    table = model.embeddings.table(0)
    scale = float(model.embeddings.row_transform.scales[0])
    with torch.no_grad():
        table[5] = 100 * scale  # grown far beyond the stored scale since the last refresh
    sparse = torch.full((2, 26), 5, dtype=torch.int64)
    out = model.embeddings(sparse)
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], 7 * scale))  # clamped at qmax * scale
    out[:, 0].sum().backward()
    g = model.embeddings.weight.grad.coalesce()  # row 5 of every table; only table 0's feeds the sum
    assert torch.equal(g.values()[g.indices()[0] == 5], torch.full((1, 8), 2.0))  # identity STE


def test_every_table_is_fake_quantized_with_its_own_scale_as_the_fused_kernel_does():
    model = _model()
    qat = prepare_qat(model, QuantConfig(emb_bits=4, scale_period=1000))
    qat.on_step(0)
    with torch.no_grad():  # some rows outgrow their table's scale: clamped
        model.embeddings.table(3)[:4] *= 5
    _, sparse, _ = _batch(7, n=64)
    out = model.embeddings(sparse)
    scales = model.embeddings.row_transform.scales
    assert len(set(scales.tolist())) > 1  # the tables' scales differ
    zero = torch.zeros((), dtype=torch.int32)
    for t in range(len(CARDS)):
        rows = model.embeddings.table(t).detach()[sparse[:, t]]
        kernel = torch.fake_quantize_per_tensor_affine(rows, scales[t], zero, -8, 7)  # one table, fused kernel
        assert torch.equal(kernel, fake_quant(rows, scales[t:t + 1], 4)), t
        assert torch.equal(out[:, t], rows + (kernel - rows)), t  # through the identity STE's sum, as before
