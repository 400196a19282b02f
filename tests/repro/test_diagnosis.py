"""repro.diagnosis on hand-made tables: which looked-up rows INT4 rounds to zero."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dqrm_mpi.repro.diagnosis import table_stats


def test_rows_below_half_a_step_round_to_zero_and_shares_weight_lookups():
    # max|W| = 0.7 -> INT4 scale 0.1: a row rounds to all zeros when every |w| < 0.05
    weight = torch.tensor([[0.7, 0.0], [0.04, -0.049], [0.06, 0.0], [0.01, 0.01], [0.3, 0.3]])
    ids = np.array([1, 1, 1, 2, 3, 0])  # row 1 three times, rows 2, 3, 0 once; row 4 never
    s = table_stats(weight, ids, bits=4)
    assert s.rows == 5 and s.max_abs == pytest.approx(0.7)
    assert s.zero_lookup_share == pytest.approx(4 / 6)  # rows 1 (x3) and 3 (x1)
    assert s.zero_row_share == pytest.approx(2 / 4)     # 2 of the 4 distinct looked-up rows
    assert s.median_abs == pytest.approx(float(weight.abs().median()))
    assert s.max_over_median == pytest.approx(0.7 / float(weight.abs().median()))


def test_no_lookups_give_zero_shares():
    s = table_stats(torch.ones(3, 4), np.array([], dtype=np.int64), bits=4)
    assert s.zero_lookup_share == 0.0 and s.zero_row_share == 0.0


def test_auc_standard_error_matches_hanley_mcneil():
    from dqrm_mpi.repro.findings import auc_standard_error

    # by hand: A = 0.9, 50 + 50: Q1 = 0.9 / 1.1, Q2 = 1.62 / 1.9,
    # var = (0.09 + 49 (Q1 - 0.81) + 49 (Q2 - 0.81)) / 2500 = 0.0010319 -> SE 0.03212
    assert auc_standard_error(0.9, 50, 50) == pytest.approx(0.03212, abs=1e-5)
    # more rows, less noise; a chance-level AUC on 10k + 10k rows: sqrt((1/12) * (1/n_pos + 1/n_neg)) ~ 0.0041
    assert auc_standard_error(0.5, 10_000, 10_000) == pytest.approx(0.0041, abs=1e-4)
