"""``report.md`` and the CSV tables: every cell with its value, the run it came from and the
paper's number; under each table the commands that re-run its runs by hand."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from .cells import Cells
from .experiment import Drop, Figure, Metric, Table
from .figures import draw
from .findings import findings_markdown
from .plan import Plan, step_run
from .results import MetricError


class Renderer(Cells):
    """Markdown and CSV of the tables and figures."""

    # --- tables ---
    def table_markdown(self, table: Table) -> str:
        paper = self.plan.profile.paper
        lines = [f"## {table.key}: {table.title}", ""]
        if table.note:
            lines += [table.note, ""]
        lines += ["| | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
        reasons: dict[str, int] = {}  # why cells are empty, numbered as footnotes
        for row in table.rows:
            numbers = row.paper.get(paper, (None,) * len(row.cells))
            texts = []
            for cell, published in zip(row.cells, numbers):
                out = self.cell(cell)
                if out.status == "ok":
                    text = out.text
                else:
                    text = f"*{out.status} [{reasons.setdefault(out.text, len(reasons) + 1)}]*"
                if out.runs:
                    text += " " + " vs ".join(f"`{r}`" for r in dict.fromkeys(out.runs))
                if published:
                    text += f" (paper {published})"
                texts.append(text.replace("|", "\\|"))
            lines.append(f"| {row.label} | " + " | ".join(texts) + " |")
        lines += [""] + [f"[{n}] {reason}  " for reason, n in reasons.items()]
        lines += ["", *self.commands(_table_steps(table, self.plan)), ""]
        return "\n".join(lines)

    def table_rows(self, table: Table) -> list[list[str]]:
        rows = [["", *table.columns]]
        for row in table.rows:
            rows.append([row.label, *(self.cell(c).text for c in row.cells)])
        return rows

    def commands(self, keys: list[str]) -> list[str]:
        """The commands of the steps ``keys``, grouped by run."""
        lines = ["Commands (run inside the report directory):", ""]
        by_run: dict[str, list[str]] = {}
        for key in dict.fromkeys(keys):
            if key in self.plan.steps:
                by_run.setdefault(step_run(key), []).append(key)
        for name, run_keys in by_run.items():
            reason = f" *not run: {self.plan.blocked[name]}*" if name in self.plan.blocked else ""
            lines.append(f"- `{name}`{reason}")
            lines += [f"  - `{self.plan.steps[k].shell()}`" for k in run_keys]
        return lines

    # --- figures ---
    def figure_markdown(self, figure: Figure, png: str) -> str:
        paper = figure.paper.get(self.plan.profile.paper, {})
        lines = [f"## {figure.key}: {figure.title}", ""]
        if figure.note:
            lines += [figure.note, ""]
        lines += [f"![{figure.key}]({png})", "", "| series | run | best AUC | train loss (last epoch) | paper AUC |",
                  "|---|---|---|---|---|"]
        for label, run in figure.series:
            auc, loss = self.cell(Metric(run, "best_auc")), self.cell(Metric(run, "train_loss"))
            cells = [c.text if c.status == "ok" else f"*{c.text}*" for c in (auc, loss)]
            lines.append(f"| {label} | `{self.plan.names[run]}` | {cells[0]} | {cells[1]} | {paper.get(label, '-')} |")
        lines += ["", *self.commands([f"train:{self.plan.names[run]}" for _, run in figure.series]), ""]
        return "\n".join(lines)


def selection_markdown(r: Renderer, plan: Plan) -> str:
    """The finished runs trained with --keep-best val: the best test AUC seen (the paper's column:
    the model picked on the test split) beside the test metrics of the best-val model
    (checkpoint-best.pt, picked without the test split).  "" when there are none."""
    rows = []
    for name in dict.fromkeys(plan.names.values()):
        if name in plan.blocked or not r.finished([f"train:{name}"]):
            continue
        try:
            summary = r.files(name).summary
        except MetricError:
            continue
        chosen, best = summary.get("selected_by_val"), summary.get("best_test")
        if not chosen or not chosen.get("test") or not best:
            continue
        test = chosen["test"]
        rows.append(f"| `{name}` | {best['auc']:.4f} @{best['step']} | {summary['final']['test']['auc']:.4f} | "
                    f"{chosen['val']['auc']:.4f} @{chosen['step']} (epoch {chosen['epoch'] + 1}) | {test['auc']:.4f} | "
                    f"{test['accuracy'] * 100:.3f} | {test['log_loss']:.4f} | {test['auc'] - best['auc']:+.4f} |")
    if not rows:
        return ""
    return "\n".join([
        "## Model selection on the validation split", "",
        "The paper reports the best test value seen during training, which picks the model on the test split "
        "(the `@N` cells above). Each run here also kept the model of its best val AUC (`--keep-best val`: "
        "`runs/NAME/checkpoint-best.pt`); its test metrics are those a user gets without looking at the test "
        "split.", "",
        "| run | best test AUC seen | final test AUC | best val AUC | its test AUC | its test accuracy (%) | "
        "its test log loss | vs best test |",
        "|---|---|---|---|---|---|---|---|", *rows, ""])


def _table_steps(table: Table, plan: Plan) -> list[str]:
    """The steps whose outputs the table's cells read."""
    keys = []
    for row in table.rows:
        for cell in row.cells:
            for metric in (cell.value, cell.reference) if isinstance(cell, Drop) else (cell,):
                if isinstance(metric, Metric):
                    keys += Renderer.chain(plan.names[metric.run], metric)
    return keys


def render(plan: Plan, out: Path, tables: tuple[Table, ...], figures: tuple[Figure, ...]) -> dict[str, int]:
    """Write report.md, tables/<key>.csv, tables/cells.csv and figures/<key>.png into ``out``.
    Returns how many cells are ok / failed / n/a / not run."""
    r = Renderer(plan, out)
    p = plan.profile
    counts = {"ok": 0, "failed": 0, "n/a": 0, "not run": 0}
    cells_csv = [["table", "row", "column", "status", "value", "runs", "paper"]]
    for t in tables:
        for row in t.rows:
            numbers = row.paper.get(p.paper, (None,) * len(row.cells))
            for column, cell, published in zip(t.columns, row.cells, numbers):
                c = r.cell(cell)
                counts[c.status] += 1
                cells_csv.append([t.key, row.label, column, c.status, c.text, " ".join(c.runs), published or ""])
        _write_csv(out / "tables" / f"{t.key}.csv", r.table_rows(t))
    _write_csv(out / "tables" / "cells.csv", cells_csv)

    parts = [f"# DQRM paper reproduction: profile `{p.name}`", "",
             f"{p.description}.", "",
             f"Dataset: `data` (made by: {'; '.join('`' + s.shell() + '`' for s in plan.steps.values() if s.key.startswith('prep:'))}). "
             f"Model preset `{p.preset}`, global batch {p.batch_size}, lr {p.lr}, {p.epochs} epoch(s), test "
             f"evaluation every {p.eval_every} steps and at each epoch end; communication experiments on "
             f"{p.comm_ranks} ranks. Paper numbers: {p.paper.capitalize()} (../shared/docs/dqrm-reference.md).", "",
             "Each cell: our value, then the run it came from (`runs/NAME`), then the paper's number where it gives "
             "one. `@N`: the step of the best test value seen (the paper reports the best value seen). Accuracy "
             "and AUC are on the test split. Train loss: mean of metrics.jsonl step `loss` over the last epoch "
             "(rank 0's batch on multi-rank runs). ms/iter: training seconds per step (no evaluation). "
             "MB sent/iter: rank 0's gradient bytes handed to Horovod per step.", "",
             f"Cells: {counts['ok']} measured, {counts['failed']} failed, {counts['n/a']} not available on this "
             f"profile, {counts['not run']} not run yet.", ""]
    parts += [r.table_markdown(t) for t in tables]
    for f in figures:
        png = f"figures/{f.key}.png"
        draw(f, {label: r.files(plan.names[run]) for label, run in f.series
                 if r.finished([f"train:{plan.names[run]}"])}, out / png)
        parts.append(r.figure_markdown(f, png))
    parts.append(selection_markdown(r, plan))
    parts.append(findings_markdown(plan, out))
    _write_text(out / "report.md", "\n".join(parts))
    return counts


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    _write_text(path, buf.getvalue())


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
