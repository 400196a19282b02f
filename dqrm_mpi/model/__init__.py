"""DLRM as named parts."""
from .config import PRESETS, ModelConfig, model_config_from_preset
from .dlrm import DLRM, BottomMLP, EmbeddingTables, PairwiseDotInteraction, TopMLP

__all__ = [
    "PRESETS", "ModelConfig", "model_config_from_preset",
    "DLRM", "BottomMLP", "EmbeddingTables", "PairwiseDotInteraction", "TopMLP",
]
