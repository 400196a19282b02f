"""Model architecture configuration and the reference presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# A Criteo sample: 13 dense (integer) features and 26 categorical ones, one table each.
NUM_DENSE = 13
NUM_SPARSE = 26


@dataclass(frozen=True)
class ModelConfig:
    """DLRM architecture.

    embedding_dim: width d of every embedding row.
    bottom_mlp: layer widths after the 13 dense inputs; the last must equal d.
    top_mlp: layer widths after the interaction; the last must be 1 (the logit).
    cardinalities: rows of each of the 26 tables (from the dataset's meta.json).
    """

    embedding_dim: int
    bottom_mlp: tuple[int, ...]
    top_mlp: tuple[int, ...]
    cardinalities: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "bottom_mlp", tuple(int(x) for x in self.bottom_mlp))
        object.__setattr__(self, "top_mlp", tuple(int(x) for x in self.top_mlp))
        object.__setattr__(self, "cardinalities", tuple(int(x) for x in self.cardinalities))
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if not self.bottom_mlp or min(self.bottom_mlp) < 1:
            raise ValueError(f"bottom_mlp needs at least one positive width, got {self.bottom_mlp}")
        if self.bottom_mlp[-1] != self.embedding_dim:
            raise ValueError(
                f"bottom MLP output width {self.bottom_mlp[-1]} must equal the embedding dim "
                f"{self.embedding_dim}: its output joins the embeddings in the dot interaction"
            )
        if not self.top_mlp or min(self.top_mlp) < 1 or self.top_mlp[-1] != 1:
            raise ValueError(f"top_mlp must end in 1 (the logit), got {self.top_mlp}")
        if len(self.cardinalities) != NUM_SPARSE or min(self.cardinalities) < 1:
            raise ValueError(f"expected {NUM_SPARSE} cardinalities >= 1, got {self.cardinalities}")

    @property
    def num_interactions(self) -> int:
        """Top-MLP input width: pairwise dots of the 27 vectors without self pairs, plus d."""
        vectors = NUM_SPARSE + 1
        return vectors * (vectors - 1) // 2 + self.embedding_dim

    @property
    def dense_inputs(self) -> int:
        return NUM_DENSE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# name -> (embedding_dim, bottom MLP after the 13 inputs, top MLP after the interaction)
PRESETS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "kaggle": (16, (512, 256, 64, 16), (512, 256, 1)),
    "terabyte": (64, (512, 256, 64), (512, 512, 256, 1)),
    "tiny": (8, (32, 8), (32, 1)),
}


def model_config_from_preset(
    preset: str,
    cardinalities: tuple[int, ...] | list[int],
    embedding_dim: int | None = None,
    bottom_mlp: tuple[int, ...] | None = None,
    top_mlp: tuple[int, ...] | None = None,
) -> ModelConfig:
    """A preset with any field overridden; cardinalities come from the dataset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    dim, bottom, top = PRESETS[preset]
    return ModelConfig(dim if embedding_dim is None else embedding_dim,
                       bottom if bottom_mlp is None else bottom_mlp,
                       top if top_mlp is None else top_mlp, tuple(cardinalities))
