"""The numbers of finished runs, read from the files the CLI tools wrote.

From a run directory: ``summary.json`` (train_seconds, steps, comm_*_per_step),
``metrics.jsonl`` (``step`` lines: step, epoch, loss; ``eval`` lines: split, step,
epoch, accuracy, auc) and the JSON that ``dqrm-export`` / ``dqrm-eval`` print
(bytes; accuracy, auc, log_loss), kept as ``<label>.export.json`` and
``<label>.eval-<split>.json``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .plan import RUNS_DIR, eval_json, export_json

LOSS_FIELD = "loss"  # metrics.jsonl step field: the mean training loss of a window over all ranks


class MetricError(Exception):
    """A metric that the run's files cannot give (the message says why)."""


@dataclass(frozen=True)
class Value:
    number: float | None
    text: str


class RunFiles:
    """One run directory, read lazily."""

    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name, self.path = out, name, out / RUNS_DIR / name

    @cached_property
    def summary(self) -> dict:
        return _load(self.path / "summary.json")

    @cached_property
    def records(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except OSError:
            raise MetricError(f"{path} is missing") from None

    @property
    def steps(self) -> list[dict]:
        return [r for r in self.records if r.get("event") == "step"]

    def evals(self, split: str = "test") -> list[dict]:
        return [r for r in self.records if r.get("event") == "eval" and r.get("split") == split]

    def epoch_ends(self) -> list[int]:
        """Steps at which an epoch ended (all but the last), for dashed lines."""
        ends, last = [], None
        for r in self.steps:
            if last is not None and r["epoch"] != last[1]:
                ends.append(last[0])
            last = (r["step"], r["epoch"])
        return ends

    def exported(self, label: str) -> dict:
        return _load(self.out / export_json(self.name, label))

    def packed_eval(self, label: str, split: str) -> dict:
        return _load(self.out / eval_json(self.name, label, split))


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError:
        raise MetricError(f"{path.name} is missing") from None
    except ValueError as e:
        raise MetricError(f"{path.name} is not JSON ({e})") from None


def _best(run: RunFiles, field: str, scale: float, digits: int) -> Value:
    evals = [r for r in run.evals() if r.get(field) is not None]
    if not evals:
        raise MetricError("no test evaluation in metrics.jsonl")
    best = max(evals, key=lambda r: r[field])
    return Value(best[field] * scale, f"{best[field] * scale:.{digits}f} @{best['step']}")


def epoch_end_aucs(run: RunFiles) -> list[float]:
    """Test AUC of the last evaluation of each epoch, in epoch order."""
    last: dict[int, dict] = {}
    for r in run.evals():
        if r["epoch"] not in last or r["step"] >= last[r["epoch"]]["step"]:
            last[r["epoch"]] = r
    if not last:
        raise MetricError("no test evaluation in metrics.jsonl")
    return [last[e]["auc"] for e in sorted(last)]


def _auc_per_epoch(run: RunFiles) -> Value:
    return Value(None, " / ".join(f"{auc:.4f}" for auc in epoch_end_aucs(run)))


def _train_loss(run: RunFiles) -> Value:
    """The last epoch's training loss averaged over all ranks (summary.json ``train_loss``);
    for runs written before that field, the step-weighted mean of the last epoch's step lines."""
    epochs = (run.summary.get("train_loss") or {}).get("per_epoch") or []
    if epochs:
        mean = epochs[-1]["loss"]
        return Value(mean, f"{mean:.4f}")
    steps = [r for r in run.steps if r.get(LOSS_FIELD) is not None]
    if not steps:
        raise MetricError(f"no `train_loss` in summary.json and no step `{LOSS_FIELD}` in metrics.jsonl")
    last = [r for r in steps if r["epoch"] == steps[-1]["epoch"]]
    weights = [r.get("steps", 1) for r in last]
    mean = sum(r[LOSS_FIELD] * w for r, w in zip(last, weights)) / sum(weights)
    return Value(mean, f"{mean:.4f}")


def _ms_per_step(run: RunFiles) -> Value:
    s = run.summary
    steps = s["steps"] - s.get("resumed_from_step", 0)
    if steps <= 0:
        raise MetricError("no training steps")
    ms = s["train_seconds"] / steps * 1e3
    return Value(ms, f"{ms:.1f}")


def _summary_mean(run: RunFiles, key: str, scale: float, digits: int) -> Value:
    mean = run.summary[key]["mean"] * scale
    return Value(mean, f"{mean:.{digits}f}")


METRICS = {
    "best_auc": lambda run, m: _best(run, "auc", 1.0, 4),
    "best_acc": lambda run, m: _best(run, "accuracy", 100.0, 3),
    "auc_per_epoch": lambda run, m: _auc_per_epoch(run),
    "train_loss": lambda run, m: _train_loss(run),
    "ms_per_step": lambda run, m: _ms_per_step(run),
    "comm_mb_per_step": lambda run, m: _summary_mean(run, "comm_bytes_sent_per_step", 1e-6, 4),
    "comm_ms_per_step": lambda run, m: _summary_mean(run, "comm_seconds_per_step", 1e3, 2),
    "size_mb": lambda run, m: _number(run.exported(m.export)["bytes"] / 1e6, 4),
    "packed_auc": lambda run, m: _number(run.packed_eval(m.export, m.split)["auc"], 4),
    "packed_acc": lambda run, m: _number(run.packed_eval(m.export, m.split)["accuracy"] * 100, 3),
    "packed_log_loss": lambda run, m: _number(run.packed_eval(m.export, m.split)["log_loss"], 4),
}


def _number(x: float, digits: int) -> Value:
    return Value(x, f"{x:.{digits}f}")


def metric_value(run: RunFiles, metric) -> Value:
    """The value of a specs Metric on ``run`` (MetricError when its files cannot give it)."""
    try:
        return METRICS[metric.key](run, metric)
    except KeyError as e:
        raise MetricError(f"{e.args[0]!r} missing from the run's files") from None
