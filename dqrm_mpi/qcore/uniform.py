"""Symmetric uniform quantization (DQRM): the bit range, scales, quantize / dequantize and
fake quantization with a straight-through estimator.  Pure functions on tensors.

    scale = max|W| / (2^(b-1) - 1)
    q     = clamp(round(W * (1/scale)), -2^(b-1), 2^(b-1) - 1)      integers
    W_hat = q * scale                                                 fake-quantized value

Rounding is half-to-even on ``W * (1/scale)`` in float32: exactly what PyTorch's fused
``fake_quantize_per_*_affine`` kernels compute, so the fake-quantized training values
and the integers written by the exporter agree bit for bit.

The backward pass of ``fake_quant`` is the straight-through estimator (STE): the
gradient passes unchanged where round(W/scale) is inside [qmin, qmax] and is zero where
it was clamped (PyTorch's "cachemask" backward).  One scale per tensor uses PyTorch's
fused kernel (fast for the small [B, d] batch rows); one scale per row / output channel
uses ``_FakeQuantAlongDim0``, an ``autograd.Function`` with the same arithmetic.
``fake_quant_own_scale`` is the case where the scales come from the tensor itself (MLP
weights): the scales and the fake quant in one node, an identity STE; on CPU float32 tensors
it runs the fused kernels of ``dqrm_mpi/csrc/fake_quant.cpp`` (same numbers, two passes).
"""
from __future__ import annotations

import torch

from .. import kernels

# The bit widths anything in dqrm_mpi quantizes to (signed integers).
MIN_BITS, MAX_BITS = 2, 16
# Smallest scale divided by: an all-zero group gets this scale (its integers are all 0).
EPS = torch.finfo(torch.float32).tiny


def check_bits(bits: int, name: str = "bits") -> int:
    """``bits`` if it is an integer in [MIN_BITS, MAX_BITS]; ValueError naming ``name`` otherwise."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def qrange(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of signed b-bit integers: (-2^(b-1), 2^(b-1) - 1)."""
    check_bits(bits)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def scale_from_max(max_abs: torch.Tensor, bits: int) -> torch.Tensor:
    """max|W| (any shape) -> float32 scale of the same shape, never below EPS."""
    return (max_abs.float() / qrange(bits)[1]).clamp_min(EPS)


def scale_from_max_(max_abs: torch.Tensor, bits: int) -> torch.Tensor:
    """In place: float32 max|W| (any shape) becomes its scale (``scale_from_max`` without a copy)."""
    return max_abs.div_(float(qrange(bits)[1])).clamp_min_(EPS)


@torch.no_grad()
def tensor_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale for the whole tensor (a table, a matrix): float32 [1].

    One pass over ``w`` without a temporary |w| copy (aminmax), which matters for
    multi-GB embedding tables.
    """
    lo, hi = torch.aminmax(w.detach())
    return scale_from_max(torch.maximum(hi, -lo).reshape(1), bits)


@torch.no_grad()
def row_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale per row (dim 0) of a 2-D tensor [n, k] -> float32 [n]."""
    w = w.detach()
    # amax and amin along rows, not aminmax(dim=1): several times faster on CPU, no |w| temporary.
    return scale_from_max(torch.maximum(w.amax(dim=1), -w.amin(dim=1)), bits)


@torch.no_grad()
def group_scales(x: torch.Tensor, groups: torch.Tensor, num_groups: int, bits: int) -> torch.Tensor:
    """One scale per group of a flat x [n] whose element i is in group ``groups[i]`` (int64 [n],
    any order) -> float32 [num_groups] (EPS for an empty group)."""
    absmax = torch.zeros(num_groups, dtype=torch.float32, device=x.device)
    absmax.scatter_reduce_(0, groups, x.detach().abs().float(), reduce="amax", include_self=True)
    return scale_from_max_(absmax, bits)


class _FakeQuantAlongDim0(torch.autograd.Function):
    """x [n, ...] with one scale per index of dim 0 (scale [n]): q * scale forward, masked STE backward.

    Same arithmetic as PyTorch's per-channel kernel (round half to even of x * (1/scale))
    but several times faster on CPU than ``fake_quantize_per_channel_affine``.
    """

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax):
        shape = (-1,) + (1,) * (x.dim() - 1)
        r = torch.round(x * (1.0 / scale).reshape(shape))
        q = r.clamp(qmin, qmax)
        ctx.save_for_backward(q != r)  # True where clamped
        return q.mul_(scale.reshape(shape))

    @staticmethod
    def backward(ctx, grad):
        (clamped,) = ctx.saved_tensors
        return grad.masked_fill(clamped, 0.0), None, None, None


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """q * scale with an STE backward.

    x float32 [n, ...]; scale float32 [1] (per tensor) or [n] (per row / output channel,
    along dim 0).  The scale is treated as a constant (no gradient).
    """
    qmin, qmax = qrange(bits)
    scale = scale.detach()
    if scale.numel() == 1 and scale.dim() <= 1:
        zero = torch.zeros((), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero, qmin, qmax)
    if scale.dim() == 1 and scale.shape[0] == x.shape[0]:
        return _FakeQuantAlongDim0.apply(x, scale.float(), qmin, qmax)
    raise ValueError(f"scale must have shape [1] or [{x.shape[0]}] for x of shape {tuple(x.shape)}, "
                     f"got {tuple(scale.shape)}")


class _FakeQuantOwnScale(torch.autograd.Function):
    """x float32 fake-quantized with the scales of x itself (``row_scales`` or ``tensor_scale``):
    nothing can be clamped, so the STE backward is the identity and no mask is kept.

    One node and few passes over x forward (amax and amin per row, or aminmax; x * (1/scale);
    round; times scale), none backward: the per-step path of MLP weights and of rowwise
    embedding rows (PyTorch's fused fake-quant kernels are scalar on CPU, several times slower).
    """

    @staticmethod
    def forward(ctx, x, bits, per_row, scale_out):
        if per_row:
            absmax = torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_(), out=scale_out)
            scale = scale_from_max_(absmax.float(), bits).unsqueeze(1)
        else:
            scale = tensor_scale(x, bits)
            if scale_out is not None:
                scale_out.copy_(scale)
        # |x * (1/scale)| <= qmax (1 + 3 float32 eps) < qmax + 1/2: a clamp would be a no-op
        return torch.mul(x, torch.reciprocal(scale)).round_().mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def _is_scale_buffer(t: torch.Tensor, n: int) -> bool:
    """Whether the kernels can write n scales into t: float32 [n], contiguous, on CPU."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.shape == (n,) and t.is_contiguous()


def fake_quant_own_scale(x: torch.Tensor, bits: int, per_row: bool, scale_out: torch.Tensor | None = None,
                         workspace: torch.Tensor | None = None) -> torch.Tensor:
    """``fake_quant(x, row_scales(x, bits), bits)`` (per_row, x [n, k]) or ``fake_quant(x,
    tensor_scale(x, bits), bits)``: the same values and gradient (an identity STE, as round(x/scale)
    is always in range) in one autograd node.  The scales (float32 [n] or [1]) are also written to
    ``scale_out`` when given.  ``workspace`` (float32 like x, owned by the caller and never read by
    it): the CPU kernel writes the result into its memory when nothing else holds it (the result of
    the previous call is gone), instead of into new memory."""
    check_bits(bits)
    if per_row and x.dim() != 2:
        raise ValueError(f"x must be 2-D [n, k] for one scale per row, got shape {tuple(x.shape)}")
    n_scales = x.shape[0] if per_row else 1
    if kernels.enabled() and x.device.type == "cpu" and x.dtype == torch.float32 and (
            scale_out is None or _is_scale_buffer(scale_out, n_scales)):  # the fused kernel, its own STE
        op = kernels.ops.fq_own_scale_rows if per_row else kernels.ops.fq_own_scale_tensor
        return op(x, bits, x.new_empty(n_scales) if scale_out is None else scale_out, workspace)
    return _FakeQuantOwnScale.apply(x, bits, per_row, scale_out)


def _int_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16


def _along_dim0(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """scale [1] -> scalar; scale [n] -> [n, 1, ...] broadcasting along dim 0 of x."""
    scale = scale.detach().float()
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.dim() == 1 and x.dim() >= 1 and scale.shape[0] == x.shape[0]:
        return scale.reshape(-1, *([1] * (x.dim() - 1)))
    raise ValueError(f"scale must have shape [1] or [{x.shape[0] if x.dim() else 1}] for a tensor of shape "
                     f"{tuple(x.shape)}, got {tuple(scale.shape)}")


@torch.no_grad()
def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers behind ``fake_quant``: x float [n, ...], scale [1] or [n] -> int8 (b <= 8) or int16 q."""
    qmin, qmax = qrange(bits)
    inv = 1.0 / _along_dim0(scale, x)
    return torch.clamp(torch.round(x.float() * inv), qmin, qmax).to(_int_dtype(bits))


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q int [n, ...] times scale ([1] or [n] along dim 0) -> float32 [n, ...]."""
    return q.float() * _along_dim0(scale, q)
