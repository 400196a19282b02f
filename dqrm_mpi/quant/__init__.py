"""Quantization of a DLRM: QAT (fake quantization), PTQ and the packed export."""
from .config import QuantConfig
from .qat import EmbeddingFakeQuant, QATState, QuantEmbeddingTables, QuantLinear, prepare_qat

__all__ = ["QuantConfig", "EmbeddingFakeQuant", "QATState", "QuantEmbeddingTables", "QuantLinear", "prepare_qat"]
