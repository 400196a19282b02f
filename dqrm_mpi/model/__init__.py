"""DLRM as named parts."""
from .config import NUM_DENSE, NUM_SPARSE, PRESETS, ModelConfig, model_config_from_preset
from .dlrm import DLRM, BottomMLP, EmbeddingTables, LinearFactory, PairwiseDotInteraction, TopMLP

__all__ = [
    "NUM_DENSE", "NUM_SPARSE", "PRESETS", "ModelConfig", "model_config_from_preset",
    "DLRM", "BottomMLP", "EmbeddingTables", "LinearFactory", "PairwiseDotInteraction", "TopMLP",
]
