"""Gradient compressors (none, fp16, int16, int8, int4; topk:RATIO and threshold:VALUE, optionally
+ a codec of the kept values), error-feedback memory and the compression configuration.
Nothing here imports Horovod."""
from . import linear, quantize, sparse  # noqa: F401  (register the compressors)
from .base import ALLGATHER, ALLREDUCE, Compressed, Compressor, compressor_names, get_compressor, register
from .config import CompressionConfig
from .memory import ResidualMemory

__all__ = ["ALLGATHER", "ALLREDUCE", "Compressed", "Compressor", "CompressionConfig", "ResidualMemory",
           "compressor_names", "get_compressor", "register"]
