"""The paper's three qualitative findings, checked on a finished reproduction, and the
diagnosis that explains a finding that does not appear (report.md's last sections).

1. Vanilla PTQ INT4 loses clearly (>= 0.01 test AUC below FP32) while DQRM INT4 stays within
   0.005 of FP32 or beats it; and per epoch (the diagnosis's PTQ of every epoch's FP32 model),
   PTQ loses clearly on the model of FP32's best epoch.
2. FP32 test AUC peaks before the last epoch and drops after it (by more than AUC_DROP and
   twice the standard error of a difference of two test AUCs), while INT4 QAT keeps improving
   over the same evaluations (its last one above its value at FP32's peak by as much); and
   FP32's training loss falls below INT4's (by more than LOSS_GAP and twice its standard error).
3. INT8 gradients without error compensation lose AUC (>= 0.001 below FP32 gradients), and MLP
   error compensation wins at least half of that back.

The curves are read from metrics.jsonl (``eval_curve``: one test evaluation per step, every
--eval-every steps and at each epoch end; ``epoch_losses``: the training loss of each epoch
with its standard error from the logging windows); the functions on them take plain lists, so
they can be checked on recorded curves.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cells import Cells
from .experiment import Metric, Run
from .plan import Plan, diagnosis_json
from .results import MetricError
from .specs import DENSE, DQRM4, FP32, INT8, NAIVE, SPARSE

PTQ_LOSS = 0.01      # finding 1: "loses clearly"
DQRM_MARGIN = 0.005  # finding 1: "stays within"
GRAD_LOSS = 0.001    # finding 3: "loses accuracy" (above run-to-run noise of the same seed's data order)
AUC_DROP = 0.002     # finding 2: the least test-AUC drop (and gain) counted, beside twice its standard error
LOSS_GAP = 0.01      # finding 2: the least training-loss gap counted, beside twice its standard error


@dataclass(frozen=True)
class Finding:
    title: str
    appears: bool | None  # None: the runs it needs have not finished
    evidence: str


def eval_curve(records: list[dict], split: str = "test") -> list[dict]:
    """The ``split`` evaluations of a run's metrics.jsonl ``records`` in step order, one per step
    (the last line of a step: runs written before a step was evaluated once held some twice)."""
    by_step = {r["step"]: r for r in records if r.get("event") == "eval" and r.get("split") == split}
    return [by_step[step] for step in sorted(by_step)]


def epoch_losses(records: list[dict]) -> list[tuple[float, float]]:
    """(training loss, its standard error) of each epoch, from metrics.jsonl ``records``: the
    loss of the ``epoch`` line, the standard error that of a mean of the epoch's window losses
    (the spread of its step lines' ``loss`` over the square root of their count; 0 for one)."""
    out = []
    for e in (r for r in records if r.get("event") == "epoch"):
        windows = [r["loss"] for r in records if r.get("event") == "step" and r.get("epoch") == e["epoch"]
                   and r.get("loss") is not None]
        se = float(np.std(windows, ddof=1) / math.sqrt(len(windows))) if len(windows) > 1 else 0.0
        out.append((e["loss"], se))
    return out


def eval_standard_error(evaluation: dict) -> float | None:
    """The standard error of one evaluation's AUC (its ``rows`` and ``ctr``; None without them)."""
    try:
        positives = round(evaluation["rows"] * evaluation["ctr"])
        return auc_standard_error(evaluation["auc"], positives, evaluation["rows"] - positives)
    except (KeyError, TypeError):
        return None


def auc_threshold(se: float | None) -> float:
    """The least AUC difference between two evaluations on one split counted as real: AUC_DROP,
    or twice the standard error of a difference of two independent AUCs (sqrt(2) SE) if larger."""
    return max(AUC_DROP, 2 * math.sqrt(2) * (se or 0.0))


@dataclass(frozen=True)
class PeakAndDrop:
    """FP32's test-AUC curve around its peak, and INT4 QAT's over the same evaluations."""

    peak: dict                  # FP32's best evaluation (the first of equal ones)
    last: dict                  # FP32's last evaluation
    qat_at_peak: dict | None    # INT4's evaluation at the peak's step
    qat_last: dict | None       # INT4's last evaluation
    threshold: float            # auc_threshold of the peak's standard error
    se: float | None

    @property
    def drop(self) -> float:
        return self.peak["auc"] - self.last["auc"]

    @property
    def fp32_overfits(self) -> bool:
        return self.peak["epoch"] < self.last["epoch"] and self.drop >= self.threshold

    @property
    def qat_gain(self) -> float | None:
        if self.qat_at_peak is None or self.qat_last is None:
            return None
        return self.qat_last["auc"] - self.qat_at_peak["auc"]

    @property
    def qat_improves(self) -> bool:
        return self.qat_gain is not None and self.qat_gain >= self.threshold


def peak_and_drop(fp32: list[dict], qat: list[dict]) -> PeakAndDrop:
    """Read from two ``eval_curve``s on the same evaluation schedule (non-empty)."""
    peak = max(fp32, key=lambda r: r["auc"])
    at = {r["step"]: r for r in qat}
    se = eval_standard_error(peak)
    return PeakAndDrop(peak, fp32[-1], at.get(peak["step"]), qat[-1] if qat else None, auc_threshold(se), se)


def loss_gap(fp32: list[tuple[float, float]], qat: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(INT4's last-epoch training loss - FP32's, the threshold: LOSS_GAP or twice the
    difference's standard error, that standard error) from two ``epoch_losses``."""
    (a, sa), (b, sb) = fp32[-1], qat[-1]
    se = math.hypot(sa, sb)
    return b - a, max(LOSS_GAP, 2 * se), se


def ptq_losses(epochs: list[dict], bits: int = 4) -> tuple[list[float], int]:
    """(PTQ's test-AUC change on each epoch's FP32 model, the index of FP32's best epoch by test
    AUC) from diagnosis.json ``epochs`` (non-empty)."""
    best = max(range(len(epochs)), key=lambda i: epochs[i]["test_auc"])
    return [e[f"ptq{bits}_test_auc"] - e["test_auc"] for e in epochs], best


def _curve(points: list[dict]) -> str:
    """``points`` grouped by epoch: ``0.7584 0.7650 | 0.7713 ...``."""
    groups: dict[int, list[str]] = {}
    for r in points:
        groups.setdefault(r["epoch"], []).append(f"{r['auc']:.4f}")
    return " | ".join(" ".join(v) for _, v in sorted(groups.items()))


class _Numbers:
    """Metric values of the plan's finished runs (None where a run has not finished)."""

    def __init__(self, plan: Plan, out: Path) -> None:
        self.plan, self.cells = plan, Cells(plan, out)

    def value(self, run: Run, key: str, export: str | None = None) -> float | None:
        return self.cells.metric(Metric(run, key, export)).number

    def records(self, run: Run) -> list[dict] | None:
        """metrics.jsonl of a finished run (None otherwise)."""
        name = self.plan.names[run]
        if not self.cells.finished([f"train:{name}"]):
            return None
        try:
            return self.cells.files(name).records
        except (MetricError, OSError, ValueError):
            return None

    def diagnosis(self) -> dict | None:
        try:
            return json.loads((self.cells.out / diagnosis_json(self.plan.names[FP32])).read_text())
        except (OSError, ValueError):
            return None

    def selected(self, run: Run) -> dict | None:
        """summary.json's selected_by_val of a finished run (--keep-best val), else None."""
        if self.records(run) is None:
            return None
        try:
            return self.cells.files(self.plan.names[run]).summary.get("selected_by_val")
        except (MetricError, OSError, ValueError):
            return None


def _missing(plan: Plan, *names: str) -> str:
    blocked = [plan.blocked[n] for n in names if n in plan.blocked]
    if blocked:
        return f"{blocked[0][0].upper()}{blocked[0][1:]}."
    return f"Needs the runs {', '.join(names)} (not finished yet)."


def ptq_gap(n: _Numbers) -> Finding:
    title = "1. Vanilla PTQ INT4 loses clearly; DQRM INT4 does not"
    fp32, ptq, dqrm = (n.value(FP32, "packed_auc", "packed"), n.value(FP32, "packed_auc", "ptq4"),
                       n.value(DQRM4, "packed_auc", "packed"))
    if None in (fp32, ptq, dqrm):
        return Finding(title, None, _missing(n.plan, n.plan.names[FP32], n.plan.names[DQRM4]))
    appears = fp32 - ptq >= PTQ_LOSS and dqrm >= fp32 - DQRM_MARGIN
    return Finding(title, appears,
                   f"test AUC of the final models: FP32 {fp32:.4f}, vanilla PTQ INT4 {ptq:.4f} "
                   f"({ptq - fp32:+.4f}; clear loss means <= -{PTQ_LOSS}), DQRM INT4 {dqrm:.4f} "
                   f"({dqrm - fp32:+.4f}; within means >= -{DQRM_MARGIN}).")


def ptq_per_epoch(n: _Numbers) -> Finding:
    title = "1b. Vanilla PTQ INT4 loses clearly on the model of FP32's best epoch"
    d = n.diagnosis()
    if not d or not d.get("epochs"):
        return Finding(title, None, _missing(n.plan, n.plan.names[FP32]) + f" Its step: diagnose:{n.plan.names[FP32]}.")
    epochs, bits = d["epochs"], d["bits"]
    losses, best = ptq_losses(epochs, bits)
    curve = eval_curve(n.records(FP32) or [])
    se = eval_standard_error(curve[-1]) if curve else None
    noise = f", standard error of one test AUC {se:.4f}" if se is not None else ""
    return Finding(title, -losses[best] >= PTQ_LOSS,
                   f"PTQ INT{bits}'s test-AUC change on each epoch's FP32 model (`dqrm-repro diagnose`): "
                   + " / ".join(f"{x:+.4f}" for x in losses)
                   + f" after epochs 1-{len(losses)}; FP32's best epoch is {best + 1} (test AUC "
                     f"{epochs[best]['test_auc']:.4f}, PTQ {epochs[best][f'ptq{bits}_test_auc']:.4f}; "
                     f"clear loss means <= -{PTQ_LOSS}{noise}).")


def overfitting(n: _Numbers) -> Finding:
    title = "2. FP32 test AUC peaks and drops after it; INT4 QAT keeps improving over the same evaluations"
    fp32, qat = n.records(FP32), n.records(DQRM4)
    if fp32 is None or qat is None:
        return Finding(title, None, _missing(n.plan, n.plan.names[FP32], n.plan.names[DQRM4]))
    a, b = eval_curve(fp32), eval_curve(qat)
    if not a or not b:
        return Finding(title, None, "no test evaluation in the runs' metrics.jsonl")
    p = peak_and_drop(a, b)
    se = f"standard error of one test AUC {p.se:.4f}, " if p.se is not None else ""
    gain = (f"DQRM INT4 {p.qat_at_peak['auc']:.4f} there and {p.qat_last['auc']:.4f} at the last "
            f"({p.qat_gain:+.4f})" if p.qat_gain is not None else "DQRM INT4 was not evaluated at that step")
    text = (f"test AUC per evaluation (epochs separated by |): FP32 {_curve(a)}; DQRM INT4 {_curve(b)}. "
            f"FP32 peaks at {p.peak['auc']:.4f} (step {p.peak['step']}, epoch {p.peak['epoch'] + 1} of "
            f"{p.last['epoch'] + 1}) and ends at {p.last['auc']:.4f} ({-p.drop:+.4f}); {gain}; "
            f"a drop or gain counts from {p.threshold:.4f} ({se}threshold max({AUC_DROP}, 2 x sqrt(2) x SE)).")
    selected = n.selected(FP32)
    if selected and selected.get("test"):
        text += (f" Selected on the val split (--keep-best val), FP32's model is step {selected['step']}'s "
                 f"(epoch {selected['epoch'] + 1}): test AUC {selected['test']['auc']:.4f}.")
    return Finding(title, p.fp32_overfits and p.qat_improves, text)


def train_loss_gap(n: _Numbers) -> Finding:
    title = "2b. FP32's training loss falls below INT4 QAT's"
    fp32, qat = n.records(FP32), n.records(DQRM4)
    if fp32 is None or qat is None:
        return Finding(title, None, _missing(n.plan, n.plan.names[FP32], n.plan.names[DQRM4]))
    a, b = epoch_losses(fp32), epoch_losses(qat)
    if not a or not b:
        return Finding(title, None, "no epoch lines in the runs' metrics.jsonl")
    gap, threshold, se = loss_gap(a, b)
    return Finding(title, gap >= threshold,
                   f"training loss per epoch: FP32 {' / '.join(f'{x:.4f}' for x, _ in a)}, DQRM INT4 "
                   f"{' / '.join(f'{x:.4f}' for x, _ in b)}; last epoch INT4 - FP32 {gap:+.4f} (standard error "
                   f"{se:.4f}; counts from {threshold:.4f}: max({LOSS_GAP}, 2 x SE); the paper: 0.437 vs 0.304 "
                   f"on Kaggle).")


def error_compensation(n: _Numbers) -> Finding:
    title = "3. INT8 gradients without error compensation lose AUC; MLP error compensation wins it back"
    fp32, naive, ec = (n.value(SPARSE, "best_auc"), n.value(NAIVE[8], "best_auc"), n.value(INT8, "best_auc"))
    if None in (fp32, naive, ec):
        return Finding(title, None, _missing(n.plan, *(n.plan.names[r] for r in (SPARSE, NAIVE[8], INT8))))
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
    for f in (ptq_gap(n), ptq_per_epoch(n), overfitting(n), train_loss_gap(n), error_compensation(n)):
        verdict = {True: "**appears**", False: "**does not appear**", None: "not measured"}[f.appears]
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
