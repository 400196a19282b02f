"""Human-readable end-of-run report from ``summary.json``'s contents."""
from __future__ import annotations

from typing import Any

from .metrics import format_auc
from .step_timer import TRAIN_PARTS


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


def format_comm_table(comm_per_rank: dict[str, Any]) -> str:
    """Per rank: bytes sent / received, ms waiting and emb / mlp bytes sent per step (mean | p95)."""
    rows = ["rank   sent/step        received/step    comm ms/step      emb sent    mlp sent   (mean | p95)"]
    for r, m in sorted(comm_per_rank["per_rank"].items(), key=lambda kv: int(kv[0])):
        def kb(key: str) -> str:
            d = m.get(key, {"mean": 0.0, "p95": 0.0})
            return f"{d['mean'] / 1e3:7.1f}|{d['p95'] / 1e3:<7.1f}"
        sec = m["seconds"]
        rows.append(f"{r:>4}   {kb('sent')} kB  {kb('received')} kB  {sec['mean'] * 1e3:6.2f}|{sec['p95'] * 1e3:<6.2f}"
                    f"  {m.get('emb.sent', {'mean': 0})['mean'] / 1e3:8.1f} kB {m.get('mlp.sent', {'mean': 0})['mean'] / 1e3:8.1f} kB")
    return "\n".join(rows)


def format_step_time(step_time: dict[str, float]) -> str:
    """``step_time`` (seconds per step by part) as one line of ms and shares of the step."""
    total = step_time["total"] or 1.0
    return (f"step time {step_time['total'] * 1e3:.2f} ms: "
            + ", ".join(f"{p} {step_time[p] * 1e3:.2f} ({100 * step_time[p] / total:.0f}%)" for p in TRAIN_PARTS)
            + _exchange_line(step_time))


def _exchange_line(step_time: dict[str, float]) -> str:
    """The exchange's span and the part the step waited for (overlap with backward), when logged."""
    line = (f"; collectives blocked {step_time['comm_wait'] * 1e3:.2f} ms, codec {step_time['codec'] * 1e3:.2f} ms")
    if step_time.get("exchange_span"):
        span, waited = step_time["exchange_span"], step_time["exchange_waited"]
        line += (f"; exchange {span * 1e3:.2f} ms from first start to last decode, the step waited "
                 f"{waited * 1e3:.2f} ({100 * waited / span:.0f}%)")
    return line


def format_summary(summary: dict[str, Any]) -> str:
    """Rank 0's end-of-run report: communication per rank (``format_comm_table``), test
    metrics (final and best, with their steps), training loss per epoch, throughput (wall
    clock, data wait included), step-time breakdown and communication per step."""
    lines = ["[dqrm-train] communication per step and rank:", format_comm_table(summary["comm_per_rank"]),
             f"== dqrm-train: {summary['steps']} steps on {summary['world_size']} rank(s), "
             f"{summary['samples_per_second']:.0f} samples/s (wall clock, data wait included)"]
    for label, m in (("final test", summary["final"].get("test")), ("best test", summary.get("best_test")),
                     ("final val", summary["final"].get("val"))):
        if m:
            lines.append(f"   {label:<10}  accuracy {m['accuracy']:.4f}  ROC AUC {format_auc(m)}  "
                         f"log loss {m['log_loss']:.4f}  ({m['rows']} rows)")
    for split in ("val", "test"):
        selected = summary.get(f"selected_by_{split}")
        if selected and selected.get("test"):
            m = selected["test"]
            lines.append(f"   test of the best {split} AUC ({selected[split]['auc']:.4f} at step {selected['step']}, "
                         f"checkpoint-best.pt)  accuracy {m['accuracy']:.4f}  ROC AUC {m['auc']:.4f}  "
                         f"log loss {m['log_loss']:.4f}")
    best = (summary.get("best") or {}).get("test") or {}
    if "accuracy" in best and "auc" in best:
        lines.append(f"   best test accuracy {best['accuracy']['value']:.4f} at step {best['accuracy']['step']}, "
                     f"best ROC AUC {best['auc']['value']:.4f} at step {best['auc']['step']}")
    epochs = (summary.get("train_loss") or {}).get("per_epoch") or []
    if epochs:
        lines.append("   train loss per epoch (all ranks): "
                     + ", ".join(f"{e['epoch']}: {e['loss']:.4f}" for e in epochs))
    if summary.get("step_time"):
        lines.append("   " + format_step_time(summary["step_time"]))
    planted = (summary.get("planted") or {}).get("test")
    if planted and "auc" in planted:
        lines.append(f"   planted model's own test AUC {planted['auc']:.4f} (the best reachable)")
    sent, recv, sec = (summary[k] for k in ("comm_bytes_sent_per_step", "comm_bytes_received_per_step",
                                            "comm_seconds_per_step"))
    lines.append(f"   communication per step (rank 0): sent {_mb(sent['mean'])} (p95 {_mb(sent['p95'])}), "
                 f"received {_mb(recv['mean'])}, waiting {sec['mean'] * 1e3:.2f} ms (p95 {sec['p95'] * 1e3:.2f} ms)")
    if summary.get("error_feedback_bytes"):
        lines.append(f"   error-feedback residuals: {_mb(summary['error_feedback_bytes'])} per rank")
    return "\n".join(lines)
