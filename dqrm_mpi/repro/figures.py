"""The figures as PNGs (matplotlib, Agg): test accuracy / AUC against steps and the
smoothed training loss per step, with dashed lines at epoch ends."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .experiment import Figure  # noqa: E402
from .results import LOSS_FIELD, MetricError, RunFiles  # noqa: E402

PANEL_LABELS = {"accuracy": "test accuracy (%)", "auc": "test ROC AUC", "loss": "training loss (smoothed)"}


def smooth(values: list[float], points: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Moving average over ``len/points`` steps: (index of each window's last value, mean)."""
    y = np.asarray(values, dtype=np.float64)
    window = max(1, len(y) // points)
    means = np.convolve(y, np.ones(window) / window, mode="valid")
    return np.arange(window - 1, len(y)), means


def draw(figure: Figure, runs: dict[str, RunFiles], path: Path) -> list[str]:
    """Write ``figure`` to ``path``; ``runs`` maps each series label to its run's files.
    Returns the labels of the series that had no data (drawn as missing)."""
    fig, axes = plt.subplots(1, len(figure.panels), figsize=(5.5 * len(figure.panels), 4), squeeze=False)
    missing, boundaries = [], None
    for label, run in runs.items():
        try:
            steps, evals = run.steps, run.evals()
        except MetricError:
            missing.append(label)
            continue
        boundaries = boundaries or run.epoch_ends()
        for ax, panel in zip(axes[0], figure.panels):
            if panel == "loss":
                losses = [r for r in steps if r.get(LOSS_FIELD) is not None]
                idx, mean = smooth([r[LOSS_FIELD] for r in losses])
                if len(mean):
                    ax.plot([losses[i]["step"] for i in idx], mean, label=label)
            elif evals:
                scale = 100.0 if panel == "accuracy" else 1.0
                ax.plot([r["step"] for r in evals], [r[panel] * scale for r in evals], marker=".", label=label)
    for ax, panel in zip(axes[0], figure.panels):
        for epoch, step in enumerate(boundaries or (), 1):
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
            ax.text(step, 1.0, f" end of epoch {epoch}", rotation=90, va="top", ha="right", fontsize=7,
                    color="grey", transform=ax.get_xaxis_transform())
        ax.set_xlabel("iteration (dashed: epoch ends)" if boundaries else "iteration")
        ax.set_ylabel(PANEL_LABELS[panel])
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{figure.key}: {figure.title}" + ("" if not missing else f"\n(missing: {', '.join(missing)})"),
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
    return missing
