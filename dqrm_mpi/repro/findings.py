"""The paper's three qualitative findings, checked on a finished reproduction, and the
diagnosis that explains a finding that does not appear (report.md's last sections).

1. Vanilla PTQ INT4 loses clearly (>= 0.01 test AUC below FP32) while DQRM INT4 stays within
   0.005 of FP32 or beats it.
2. FP32 test AUC peaks after epoch 1-2 (before the last epoch), while INT4 QAT keeps improving
   (its last epoch is its best).
3. INT8 gradients without error compensation lose AUC (>= 0.001 below FP32 gradients), and MLP
   error compensation wins at least half of that back.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .cells import Cells
from .experiment import Metric, Run
from .plan import Plan, diagnosis_json
from .results import MetricError, epoch_end_aucs
from .specs import DENSE, DQRM4, FP32, INT8, NAIVE, SPARSE

PTQ_LOSS = 0.01      # finding 1: "loses clearly"
DQRM_MARGIN = 0.005  # finding 1: "stays within"
GRAD_LOSS = 0.001    # finding 3: "loses accuracy" (above run-to-run noise of the same seed's data order)


@dataclass(frozen=True)
class Finding:
    title: str
    appears: bool | None  # None: the runs it needs have not finished
    evidence: str


class _Numbers:
    """Metric values of the plan's finished runs (None where a run has not finished)."""

    def __init__(self, plan: Plan, out: Path) -> None:
        self.plan, self.cells = plan, Cells(plan, out)

    def value(self, run: Run, key: str, export: str | None = None) -> float | None:
        return self.cells.metric(Metric(run, key, export)).number

    def epoch_aucs(self, run: Run) -> list[float] | None:
        name = self.plan.names[run]
        if not self.cells.finished([f"train:{name}"]):
            return None
        try:
            return epoch_end_aucs(self.cells.files(name))
        except (MetricError, OSError, ValueError):
            return None


def _missing(*names: str) -> str:
    return f"not measured yet: needs the runs {', '.join(names)}"


def ptq_gap(n: _Numbers) -> Finding:
    title = "1. Vanilla PTQ INT4 loses clearly; DQRM INT4 does not"
    fp32, ptq, dqrm = (n.value(FP32, "packed_auc", "packed"), n.value(FP32, "packed_auc", "ptq4"),
                       n.value(DQRM4, "packed_auc", "packed"))
    if None in (fp32, ptq, dqrm):
        return Finding(title, None, _missing(n.plan.names[FP32], n.plan.names[DQRM4]))
    appears = fp32 - ptq >= PTQ_LOSS and dqrm >= fp32 - DQRM_MARGIN
    return Finding(title, appears,
                   f"test AUC of the final models: FP32 {fp32:.4f}, vanilla PTQ INT4 {ptq:.4f} "
                   f"({ptq - fp32:+.4f}; clear loss means <= -{PTQ_LOSS}), DQRM INT4 {dqrm:.4f} "
                   f"({dqrm - fp32:+.4f}; within means >= -{DQRM_MARGIN}).")


def overfitting(n: _Numbers) -> Finding:
    title = "2. FP32 peaks after epoch 1-2; INT4 QAT keeps improving"
    fp32, qat = n.epoch_aucs(FP32), n.epoch_aucs(DQRM4)
    if fp32 is None or qat is None:
        return Finding(title, None, _missing(n.plan.names[FP32], n.plan.names[DQRM4]))
    peak = max(range(len(fp32)), key=fp32.__getitem__)
    fp32_peaks = len(fp32) > 1 and peak < len(fp32) - 1
    qat_improves = max(range(len(qat)), key=qat.__getitem__) == len(qat) - 1
    return Finding(title, fp32_peaks and qat_improves,
                   f"test AUC at each epoch end: FP32 {' / '.join(f'{a:.4f}' for a in fp32)} "
                   f"(best at epoch {peak + 1} of {len(fp32)}), DQRM INT4 {' / '.join(f'{a:.4f}' for a in qat)}.")


def error_compensation(n: _Numbers) -> Finding:
    title = "3. INT8 gradients without error compensation lose AUC; MLP error compensation wins it back"
    fp32, naive, ec = (n.value(SPARSE, "best_auc"), n.value(NAIVE[8], "best_auc"), n.value(INT8, "best_auc"))
    if None in (fp32, naive, ec):
        return Finding(title, None, _missing(*(n.plan.names[r] for r in (SPARSE, NAIVE[8], INT8))))
    loss = fp32 - naive
    appears = loss >= GRAD_LOSS and ec - naive >= loss / 2
    return Finding(title, appears,
                   f"best test AUC: FP32 gradients {fp32:.4f}, INT8 without error compensation {naive:.4f} "
                   f"({naive - fp32:+.4f}; a loss means <= -{GRAD_LOSS}), INT8 with MLP error compensation "
                   f"{ec:.4f} ({ec - naive:+.4f} over no compensation; winning back means at least half the loss).")


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982): the standard error of an AUC measured on ``positives`` clicks and
    ``negatives`` non-clicks, the scale against which AUC differences on one test split are read."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)) / (
        positives * negatives)
    return math.sqrt(max(var, 0.0))


def _noise(n: _Numbers) -> str:
    """A sentence giving the test AUC's standard error (from the FP32 model's evaluation)."""
    try:
        e = n.cells.files(n.plan.names[FP32]).packed_eval("packed", "test")
        positives = round(e["rows"] * e["ctr"])
        se = auc_standard_error(e["auc"], positives, e["rows"] - positives)
    except (MetricError, OSError, ValueError, KeyError):
        return ""
    text = (f"The test split has {e['rows']} rows ({positives} clicks): a test AUC near {e['auc']:.3f} has a "
            f"standard error of about {se:.4f} (Hanley-McNeil), so differences below that are within "
            "sampling noise (differences between models on the same rows are somewhat less noisy).")
    dense, sparse = n.value(DENSE, "best_auc"), n.value(SPARSE, "best_auc")
    if dense is not None and sparse is not None:
        text += (f" The dense and sparse embedding exchanges (Table 4) train the same model up to the order of "
                 f"float sums, and end {abs(dense - sparse):.4f} apart in best test AUC ({dense:.4f} vs "
                 f"{sparse:.4f}): the spread of one run.")
    return text


def findings_markdown(plan: Plan, out: Path) -> str:
    """The findings and the diagnosis as markdown ("" where the plan lacks the paper's runs)."""
    if not all(run in plan.names for run in (FP32, DQRM4, SPARSE, NAIVE[8], INT8)):
        return ""
    n = _Numbers(plan, out)
    lines = ["## The paper's findings on this data", ""]
    for f in (ptq_gap(n), overfitting(n), error_compensation(n)):
        verdict = {True: "**appears**", False: "**does not appear**", None: "not measured yet"}[f.appears]
        lines += [f"- {f.title}: {verdict}. {f.evidence}"]
    noise = _noise(n)
    return "\n".join(lines + (["", noise] if noise else []) + ["", diagnosis_markdown(plan, out)])


def diagnosis_markdown(plan: Plan, out: Path) -> str:
    name = plan.names[FP32]
    path = out / diagnosis_json(name)
    lines = ["## Diagnosis: what PTQ INT4 does to the FP32 model", ""]
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return "\n".join(lines + [f"Not available yet: `{path.relative_to(out)}` (step `diagnose:{name}`)."])
    bits = d["bits"]
    lines += [f"From `runs/{name}` (`dqrm-repro diagnose`): INT{bits}, one scale per embedding table, as "
              f"`dqrm-export --bits {bits}` quantizes.", ""]
    if d["epochs"]:
        splits = [k.removesuffix("_auc") for k in d["epochs"][0] if k.endswith("_auc") and not k.startswith("ptq")]
        lines += ["| epoch | " + " | ".join(f"FP32 {s} AUC" for s in splits) + f" | PTQ INT{bits} test AUC | PTQ loss |",
                  "|---|" + "---|" * (len(splits) + 2)]
        for e in d["epochs"]:
            ptq = e[f"ptq{bits}_test_auc"]
            lines.append(f"| {e['epoch'] + 1} | " + " | ".join(f"{e[s + '_auc']:.4f}" for s in splits)
                         + f" | {ptq:.4f} | {ptq - e['test_auc']:+.4f} |")
        lines.append("")
    else:
        lines += [d.get("epochs_note", ""), ""]
    lines += [f"Final model: {d['zero_lookup_share'] * 100:.1f} % of the test split's embedding lookups read a row "
              f"that INT{bits} rounds to all zeros. Per table (max/median of |W| over the whole table; shares "
              "over the test split's lookups and over its distinct looked-up rows):", "",
              "| table | rows | max abs W | median abs W | max / median | lookups zeroed | looked-up rows zeroed |",
              "|---|---|---|---|---|---|---|"]
    for t, s in enumerate(d["tables"]):
        lines.append(f"| C{t + 1} | {s['rows']} | {s['max_abs']:.4f} | {s['median_abs']:.5f} | "
                     f"{s['max_over_median']:.1f} | {s['zero_lookup_share'] * 100:.1f} % | "
                     f"{s['zero_row_share'] * 100:.1f} % |")
    return "\n".join(lines + [""])
