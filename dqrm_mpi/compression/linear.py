"""Linear compressors: their payloads may be summed by allreduce."""
from __future__ import annotations

import torch

from .base import ALLREDUCE, Compressed, Compressor, register


@register
class NoneCompressor(Compressor):
    """FP32 as is (the uncompressed baseline; bit-exact)."""

    name = "none"
    linear = True
    collective = ALLREDUCE
    bits = 32
    lossless = True

    @property
    def wire_dtype(self) -> torch.dtype:
        return torch.float32

    def compress(self, x, groups=None, num_groups=1):
        return Compressed(x, torch.empty(0), x.numel())

    def decompress(self, c, groups=None):
        return c.data


@register
class FP16Compressor(Compressor):
    """IEEE half precision (values beyond +-65504 overflow to inf, as in Horovod's fp16)."""

    name = "fp16"
    linear = True
    collective = ALLREDUCE
    bits = 16

    @property
    def wire_dtype(self) -> torch.dtype:
        return torch.float16

    def compress(self, x, groups=None, num_groups=1):
        return Compressed(x.to(torch.float16), torch.empty(0), x.numel())

    def decompress(self, c, groups=None):
        return c.data.to(torch.float32)
