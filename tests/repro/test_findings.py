"""The findings' readings of recorded curves: issue 21's medium runs (10 M criteo-like rows, test
AUC every quarter epoch) and the small profile's (README), as metrics.jsonl would hold them."""
from __future__ import annotations

import pytest

from dqrm_mpi.repro.findings import (AUC_DROP, PTQ_LOSS, auc_threshold, epoch_losses, eval_curve, loss_gap,
                                     peak_and_drop, ptq_losses)

QUARTER = 16_741  # steps: 8,571,429 training rows at batch 128 = 66,964 steps per epoch
TEST_ROWS, CTR = 714_286, 0.25
FP32 = ((0.7584, 0.7650, 0.7684, 0.7705), (0.7713, 0.7710, 0.7723, 0.7730),
        (0.7685, 0.7679, 0.7699, 0.7704), (0.7376, 0.7362, 0.7450, 0.7252))
INT4 = ((0.7541, 0.7606, 0.7640, 0.7663), (0.7678, 0.7685, 0.7697, 0.7702),
        (0.7710, 0.7713, 0.7719, 0.7722), (0.7719, 0.7726, 0.7732, 0.7734))
FP32_LOSS, INT4_LOSS = (0.484, 0.467, 0.454, 0.378), (0.487, 0.475, 0.471, 0.469)
PTQ = (0.7672, 0.7684, 0.7662, 0.7478)  # dqrm-export --bits 4 of each epoch's FP32 checkpoint


def _records(aucs, losses=None, per_epoch=4, quarter=QUARTER, rows=TEST_ROWS):
    """metrics.jsonl lines: a test eval every ``quarter`` steps, step windows and epoch lines."""
    records = []
    for e, epoch in enumerate(aucs):
        for q, auc in enumerate(epoch, 1):
            step = (e * per_epoch + q) * quarter
            if losses:  # two windows a quarter, spread 0.002 around the epoch's loss
                records += [{"event": "step", "epoch": e, "step": step - quarter // 2, "loss": losses[e] - 0.001},
                            {"event": "step", "epoch": e, "step": step, "loss": losses[e] + 0.001}]
            records.append({"event": "eval", "split": "test", "epoch": e, "step": step, "auc": auc,
                            "rows": rows, "ctr": CTR})
        if losses:
            records.append({"event": "epoch", "epoch": e, "step": (e + 1) * per_epoch * quarter, "loss": losses[e]})
    return records


def test_fp32_peaks_at_the_end_of_epoch_2_and_collapses_while_int4_keeps_rising():
    p = peak_and_drop(eval_curve(_records(FP32)), eval_curve(_records(INT4)))
    assert (p.peak["epoch"], p.peak["step"], p.peak["auc"]) == (1, 8 * QUARTER, 0.7730)
    assert p.drop == pytest.approx(0.7730 - 0.7252) and p.fp32_overfits
    assert p.qat_at_peak["auc"] == 0.7702 and p.qat_gain == pytest.approx(0.0032) and p.qat_improves
    # 714 k test rows: a standard error near 0.0007, so twice that of a difference is about 0.002
    assert 0.0005 < p.se < 0.0009 and p.threshold == pytest.approx(max(AUC_DROP, 2 * 2 ** 0.5 * p.se))


def test_a_curve_still_rising_at_its_last_epoch_does_not_overfit():
    # the small profile (README): test AUC at each epoch end, 21,429 test rows
    fp32 = _records(((0.7104,), (0.7408,), (0.7559,)), per_epoch=1, rows=21_429)
    qat = _records(((0.7064,), (0.7395,), (0.7531,)), per_epoch=1, rows=21_429)
    p = peak_and_drop(eval_curve(fp32), eval_curve(qat))
    assert p.peak["epoch"] == 2 and p.drop == 0 and not p.fp32_overfits
    assert p.qat_gain == 0 and not p.qat_improves  # nothing after FP32's peak to gain over


def test_a_drop_within_the_noise_is_not_counted():
    fp32 = _records(((0.7700, 0.7712), (0.7705, 0.7702)), per_epoch=2)  # -0.001 after the peak
    qat = _records(((0.7690, 0.7700), (0.7705, 0.7740)), per_epoch=2)
    p = peak_and_drop(eval_curve(fp32), eval_curve(qat))
    assert p.peak["epoch"] < p.last["epoch"] and p.drop == pytest.approx(0.001)
    assert not p.fp32_overfits and p.qat_improves
    assert auc_threshold(None) == AUC_DROP and auc_threshold(0.004) == pytest.approx(2 * 2 ** 0.5 * 0.004)


def test_a_step_logged_twice_is_one_point_of_the_curve():
    records = _records(FP32)
    doubled = records + [dict(r) for r in records if r["step"] % (4 * QUARTER) == 0]  # each epoch end again
    assert eval_curve(doubled) == eval_curve(records) and len(eval_curve(records)) == 16


def test_training_loss_gap_and_its_standard_error():
    fp32, int4 = epoch_losses(_records(FP32, FP32_LOSS)), epoch_losses(_records(INT4, INT4_LOSS))
    assert [x for x, _ in fp32] == list(FP32_LOSS)
    assert fp32[0][1] == pytest.approx(0.001 * (8 / 7) ** 0.5 / 8 ** 0.5)  # sd of 8 windows +-0.001, / sqrt(8)
    gap, threshold, se = loss_gap(fp32, int4)
    assert gap == pytest.approx(0.469 - 0.378) and gap >= threshold and se == pytest.approx(2 ** 0.5 * fp32[0][1])
    gap, threshold, _ = loss_gap(fp32, epoch_losses(_records(INT4, (0.484, 0.467, 0.454, 0.383))))
    assert gap == pytest.approx(0.005) and gap < threshold  # within LOSS_GAP


def test_ptq_loss_per_epoch_is_read_on_fp32s_best_epoch():
    ends = [epoch[-1] for epoch in FP32]
    epochs = [{"epoch": e, "test_auc": auc, "ptq4_test_auc": ptq} for e, (auc, ptq) in enumerate(zip(ends, PTQ))]
    losses, best = ptq_losses(epochs)
    assert losses == pytest.approx([-0.0033, -0.0046, -0.0042, 0.0226])
    assert best == 1 and -losses[best] < PTQ_LOSS  # finding 1 does not appear at this size (issue 21)
