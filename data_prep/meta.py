"""Pass 6, meta: what the run made and how, as the dataset's ``meta.json``."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dqrm_mpi.data.schema import SPLITS, DatasetMeta

from .criteo_format import MAX_EXAMPLES
from .options import PrepOptions
from .output_dir import PREP_VERSION, fingerprint_hash
from .parse import SPLIT_CODES, PieceSummary
from .sources import Source, planted_path

SPLIT_RULES = {
    "kaggle": "kaggle: 7 equal consecutive days, days 0-5 train, day 6 first half test, second half val",
    "terabyte": "terabyte: all days but the last train, last day first half test, second half val",
}


def split_totals(per_piece: Sequence[list[int]]) -> dict[str, int]:
    """Per split name, the sum of the pieces' counts (lists indexed by split code)."""
    return {name: sum(c[code] for c in per_piece) for name, code in SPLIT_CODES.items()}


@dataclass(frozen=True)
class RunRecord:
    """How this run went (recorded in meta.json's extra, not part of the fingerprint)."""

    mpi_ranks: int
    resumed: bool
    shards_written: int
    stage_seconds: dict[str, float]
    wall_time_s: float


def build_meta(kind: str, sources: Sequence[Source], opts: PrepOptions, fp: dict[str, Any],
               summaries: Sequence[PieceSummary], vocab_infos: Sequence[dict], sparse_dtype: str,
               buckets: int, run: RunRecord, input_map: dict[str, Any] | None = None) -> DatasetMeta:
    """input_map: what ``input_map.write_input_map`` returned (file, sha256, bytes)."""
    totals = split_totals([s.rows for s in summaries])
    positives = split_totals([s.positives for s in summaries])
    extra = {
        "tool": "dqrm-prep criteo",
        "prep_version": PREP_VERSION,
        "sources": [{"name": s.name, "path": str(Path(s.path).resolve()), "size": s.size,
                     "gzip": s.gz, "lines": s.lines if s.lines >= 0 else None} for s in sources],
        "counts": {"lines_read": sum(s.lines for s in summaries), "rows_kept": sum(totals.values()),
                   "rows_skipped_bad": sum(s.bad for s in summaries),
                   "rows_subsampled": sum(s.subsampled for s in summaries), "positives": positives},
        "bad_line_examples": [e for s in summaries for e in s.bad_examples][:MAX_EXAMPLES],
        "distinct_values": [i["distinct"] for i in vocab_infos],
        "sparse_dtype": sparse_dtype,
        "label_dtype": opts.label_dtype,
        "shards": {split: math.ceil(totals[split] / opts.shard_rows) for split in SPLITS},
        "split_rule": SPLIT_RULES[kind],
        "shuffle_buckets": buckets,
        "workers": opts.workers,
        "mpi_ranks": run.mpi_ranks,
        "resumed": run.resumed,
        "shards_written_this_run": run.shards_written,
        "stage_seconds": run.stage_seconds,
        "wall_time_s": run.wall_time_s,
    }
    if input_map is not None:
        extra["input_map"] = input_map
    planted = planted_metrics_for(kind, sources, totals)
    if planted is not None:
        extra["planted"] = planted
        extra["planted_source"] = planted_path(sources[0].path).name
    return DatasetMeta(
        cardinalities=[i["cardinality"] for i in vocab_infos],
        rows=totals,
        ctr=positives["train"] / max(1, totals["train"]),
        options={**opts.output_options(), "kind": kind, "fingerprint": fingerprint_hash(fp), "fingerprint_fields": fp},
        extra=extra,
    )


def planted_metrics_for(kind: str, sources: Sequence[Source], totals: dict[str, int]) -> dict | None:
    """The planted model's test/val metrics from ``RAW.planted.json`` (``dqrm-prep synth``),
    in the shape ``write_synthetic_dataset`` records (``{"test": {...}, "val": {...}}``), when
    the dataset's test and val rows are exactly the rows they were computed on: one Kaggle
    file with the line count the sidecar names, and no test/val line skipped.  None otherwise."""
    if kind != "kaggle" or len(sources) != 1:
        return None
    src = sources[0]
    side = planted_path(src.path)
    if not side.is_file():
        return None
    try:
        info = json.loads(side.read_text())
        ok = (int(info["rows"]) == src.lines
              and all(int(info[split]["rows"]) == totals[split] for split in ("test", "val")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ok:
        return None
    return {split: dict(info[split]) for split in ("test", "val")}


def summary_line(out: Path, meta: DatasetMeta) -> str:
    """The one line `dqrm-prep criteo` prints when it finishes."""
    rows, counts = meta.rows, meta.extra["counts"]
    msg = (f"{out}: {rows['train']:,} train / {rows['val']:,} val / {rows['test']:,} test rows "
           f"from {counts['lines_read']:,} lines in {meta.extra['wall_time_s']:.1f} s")
    bad, examples = counts["rows_skipped_bad"], meta.extra["bad_line_examples"]
    if bad:
        msg += f"; skipped {bad:,} bad lines (first: {examples[0]['path']}:{examples[0]['line']})" if examples else f"; skipped {bad:,} bad lines"
    return msg
