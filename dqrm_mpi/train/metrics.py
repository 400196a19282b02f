"""Binary click-prediction metrics: accuracy, ROC AUC and log loss (scikit-learn)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


def binary_metrics(label: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """label [n] in {0, 1}, prob [n] click probabilities -> accuracy, auc, log_loss, rows, ctr.

    AUC is NaN when only one class is present (it is undefined then).
    """
    label = np.asarray(label, dtype=np.float64)
    prob = np.asarray(prob, dtype=np.float64)
    if label.shape != prob.shape or label.ndim != 1:
        raise ValueError(f"label and prob must be equal 1-D arrays, got {label.shape} and {prob.shape}")
    if len(label) == 0:
        raise ValueError("no rows to evaluate")
    both = len(np.unique(label)) == 2
    return {
        "accuracy": float(np.mean((prob >= threshold) == (label == 1))),
        "auc": float(roc_auc_score(label, prob)) if both else float("nan"),
        "log_loss": float(log_loss(label, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "rows": int(len(label)),
        "ctr": float(label.mean()),
    }
