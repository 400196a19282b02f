import math

import numpy as np
import pytest

from dqrm_mpi.train.metrics import binary_metrics


def test_metrics_against_hand_computation():
    label = np.array([0, 0, 1, 1])
    prob = np.array([0.1, 0.6, 0.35, 0.8])
    m = binary_metrics(label, prob)
    assert m["accuracy"] == 0.5  # 0.1 right, 0.6 wrong, 0.35 wrong, 0.8 right
    assert m["auc"] == 0.75  # 3 of the 4 (pos, neg) pairs ordered right
    expected = -np.mean([math.log(0.9), math.log(0.4), math.log(0.35), math.log(0.8)])
    assert m["log_loss"] == pytest.approx(expected)


def test_single_class_auc_is_nan_and_empty_is_error():
    assert math.isnan(binary_metrics(np.zeros(3), np.full(3, 0.2))["auc"])
    with pytest.raises(ValueError):
        binary_metrics(np.zeros(0), np.zeros(0))
