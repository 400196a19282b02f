"""A spec cell's value, read from the files of a report directory's finished runs (or why
there is none: failed, not available on this profile, not run yet)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .experiment import Drop, Metric, NotMeasured
from .plan import Plan
from .results import MetricError, RunFiles, metric_value
from .runner import failure_path, is_finished, read_json


@dataclass(frozen=True)
class CellOut:
    status: str           # ok, failed, n/a, not run
    text: str             # the value (or why there is none), without the run
    runs: tuple[str, ...]
    number: float | None = None


class Cells:
    """The values of spec cells, read from a report directory's finished runs."""

    def __init__(self, plan: Plan, out: Path) -> None:
        self.plan, self.out = plan, out
        self._files: dict[str, RunFiles] = {}

    def files(self, name: str) -> RunFiles:
        return self._files.setdefault(name, RunFiles(self.out, name))

    def cell(self, cell) -> CellOut:
        if isinstance(cell, NotMeasured):
            return CellOut("n/a", cell.reason, ())
        if isinstance(cell, Drop):
            a, b = self.cell(cell.value), self.cell(cell.reference)
            if a.number is None or b.number is None:
                bad = a if a.number is None else b
                return CellOut(bad.status, bad.text, a.runs + b.runs)
            d = (a.number - b.number) if cell.higher_is_worse else (b.number - a.number)
            return CellOut("ok", f"{d:+.4f}", a.runs + b.runs, d)
        return self.metric(cell)

    def finished(self, keys: list[str]) -> bool:
        """Whether every step ``keys`` names has finished (a run still going, or stopped part way,
        has files with numbers in them that no cell may show)."""
        return all(is_finished(self.out, self.plan.steps[key], self.plan) for key in keys)

    def metric(self, metric: Metric) -> CellOut:
        name = self.plan.names[metric.run]
        problem = "not finished"
        if self.finished(self.chain(name, metric)):
            try:
                value = metric_value(self.files(name), metric)
                return CellOut("ok", value.text, (name,), value.number)
            except MetricError as e:
                problem = str(e)
        steps = [self.plan.steps[key] for key in self.chain(name, metric)]
        for step in steps:  # the first failure is the cause
            failure = read_json(failure_path(self.out, step))
            if failure:
                return CellOut("failed", f"FAILED: {failure['error']} (log: {failure['log']})", (name,))
        for step in reversed(steps):  # the last step's reason is the most specific
            if step.blocked:
                return CellOut("n/a", step.blocked, (name,))
        if self.finished(self.chain(name, metric)):
            return CellOut("n/a", problem, (name,))
        return CellOut("not run", "not run yet", (name,))

    @staticmethod
    def chain(name: str, metric: Metric) -> list[str]:
        keys = [f"train:{name}"]
        if metric.export:
            keys += [f"export:{name}/{metric.export}", f"eval:{name}/{metric.export}/{metric.split}"]
        return keys
