"""The quantization core: symmetric uniform quantization, scale granularity and bit packing.

Used by QAT and PTQ (``quant``), the packed-model export and the gradient codecs
(``compression``).  Depends on torch, and on the fused CPU kernels of ``dqrm_mpi.kernels``
(with a PyTorch fallback).
"""
from .granularity import CHANNEL, ROW, TABLE, TENSOR, check_granularity
from .pack import pack, pack_int4_into, packed_row_bytes, unpack, unpack_int4_into
from .uniform import (EPS, MAX_BITS, MIN_BITS, check_bits, dequantize, fake_quant, fake_quant_own_scale,
                      group_scales, qrange, quantize, row_scales, scale_from_max, scale_from_max_, tensor_scale)

__all__ = ["CHANNEL", "ROW", "TABLE", "TENSOR", "check_granularity",
           "pack", "pack_int4_into", "packed_row_bytes", "unpack", "unpack_int4_into",
           "EPS", "MAX_BITS", "MIN_BITS", "check_bits", "dequantize", "fake_quant", "fake_quant_own_scale",
           "group_scales", "qrange", "quantize", "row_scales", "scale_from_max", "scale_from_max_", "tensor_scale"]
