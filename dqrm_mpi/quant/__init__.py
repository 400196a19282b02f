"""Quantization: uniform symmetric fake quantization, QAT of a DLRM, PTQ, packed export."""
from .config import QuantConfig
from .qat import EmbeddingFakeQuant, QATState, QuantLinear, prepare_qat

__all__ = ["QuantConfig", "EmbeddingFakeQuant", "QATState", "QuantLinear", "prepare_qat"]
