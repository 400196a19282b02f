"""Error feedback (residual memory) keyed by parameter name.

Per step:  compensated = grad + residual[name];  transmit compress(compensated);
residual[name] = compensated - decompress(compress(compensated)).
Summed over steps, what a rank transmitted equals what it computed minus the current
residual, so quantization error is delayed, never lost.
"""
from __future__ import annotations

import torch


class ResidualMemory:
    """Dense residuals, created on first use (zeros)."""

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def compensate(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        r = self.residuals.get(name)
        return grad if r is None else grad + r

    def update(self, name: str, compensated: torch.Tensor, transmitted: torch.Tensor) -> None:
        self.residuals[name] = compensated - transmitted

    # Sparse (embedding) residuals: a table-sized tensor per table; only the rows a step
    # touches are compensated and updated, the rest wait for their row's next gradient.
    def compensate_rows(self, name: str, shape: tuple[int, int], rows: torch.Tensor,
                        values: torch.Tensor) -> torch.Tensor:
        r = self.residuals.get(name)
        if r is None:
            r = self.residuals[name] = torch.zeros(shape, dtype=torch.float32, device=values.device)
        return values + r[rows]

    def update_rows(self, name: str, rows: torch.Tensor, compensated: torch.Tensor,
                    transmitted: torch.Tensor) -> None:
        self.residuals[name][rows] = compensated - transmitted

    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.residuals.values())
