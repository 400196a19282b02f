"""Vanilla post-training quantization (the paper's "vanilla PTQ" row): quantize the
weights of a trained FP32 DLRM with the same quantizers as QAT, without retraining."""
from __future__ import annotations

from torch import nn

from .config import QuantConfig
from .qat import QATState, prepare_qat


def post_training_quantize(model: nn.Module, config: QuantConfig) -> QATState:
    """Make an FP32 ``model`` (a DLRM) evaluate as ``config``'s quantized model, in place.

    Per-table scales come from one full-table pass over the trained tables; MLP scales
    from the trained weights.  Activations would need calibration data: not supported.
    """
    if not config.enabled:
        raise ValueError("post-training quantization needs emb_bits and/or mlp_bits")
    if config.act_bits is not None:
        raise ValueError("vanilla PTQ quantizes weights only: activation scales would need calibration data "
                         "(train with act_bits instead)")
    if config.pretrain_epochs:
        raise ValueError("pretrain_epochs is a training option; it has no meaning for PTQ")
    state = prepare_qat(model, config)
    state.on_step(0)
    model.eval()
    return state
