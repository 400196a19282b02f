"""Binary click-prediction metrics: accuracy, ROC AUC and log loss (scikit-learn)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


def binary_metrics(label: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """label [n] in {0, 1}, prob [n] click probabilities -> accuracy, auc, log_loss, rows, ctr.

    AUC is NaN when only one class is present (it is undefined then), and ``auc_undefined``
    then says why (``format_auc`` writes it so; JSON files hold null).
    """
    label = np.asarray(label, dtype=np.float64)
    prob = np.asarray(prob, dtype=np.float64)
    if label.shape != prob.shape or label.ndim != 1:
        raise ValueError(f"label and prob must be equal 1-D arrays, got {label.shape} and {prob.shape}")
    if len(label) == 0:
        raise ValueError("no rows to evaluate")
    both = len(np.unique(label)) == 2
    result = {
        "accuracy": float(np.mean((prob >= threshold) == (label == 1))),
        "auc": float(roc_auc_score(label, prob)) if both else float("nan"),
        "log_loss": float(log_loss(label, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "rows": int(len(label)),
        "ctr": float(label.mean()),
    }
    if not both:
        result["auc_undefined"] = (f"all {len(label)} labels are {int(label[0])}: ROC AUC needs rows of both "
                                   "classes")
    return result


def format_auc(metrics: dict) -> str:
    """The AUC of ``binary_metrics``'s result as text: 4 decimals, or "undefined (why)"."""
    if metrics.get("auc_undefined") or metrics.get("auc") is None:
        return f"undefined ({metrics.get('auc_undefined') or 'one class only'})"
    return f"{metrics['auc']:.4f}"
