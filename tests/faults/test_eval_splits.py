"""Splits too small or too one-sided for an AUC: a 5-row test split evaluates on 2 ranks (2 and
3 rows), and a split whose labels are all 0 gives an AUC that is said to be undefined, null in
the JSON files, never NaN passed off as a number."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dqrm_mpi.data.synthetic import PlantedClickModel, write_synthetic_dataset
from dqrm_mpi.train.run_dir import read_metrics

from ..conftest import SMALL_CARDINALITIES, VENV_BIN, run_cmd
from .conftest import on_ranks, train_args, write_rows

EVAL = str(VENV_BIN / "dqrm-eval")


def _strict_json(text: str):
    """JSON as the standard has it: NaN and Infinity are not numbers there."""
    def refuse(word):
        raise AssertionError(f"{word} in JSON: {text[:300]}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def five_rows(tmp_path_factory) -> Path:
    """2,000 training rows; val and test splits of 5 rows each (both classes in the test split)."""
    out = tmp_path_factory.mktemp("five") / "ds"
    write_synthetic_dataset(out, {"train": 2_000, "val": 5, "test": 5}, PlantedClickModel(SMALL_CARDINALITIES, seed=7))
    return out


def test_five_row_split_is_evaluated_on_two_ranks(five_rows, tmp_path):
    out = tmp_path / "run"
    run_cmd(on_ranks(2, train_args(five_rows, out, "--max-steps", "2")))
    summary = _strict_json((out / "summary.json").read_text())
    test = summary["final"]["test"]
    assert test["rows"] == 5 and 0.0 < test["ctr"] < 1.0 and isinstance(test["auc"], float)
    assert [r["rows"] for r in read_metrics(out) if r["event"] == "eval"] == [5]


def test_split_with_one_class_says_auc_is_undefined(five_rows, tmp_path):
    data = Path(shutil.copytree(five_rows, tmp_path / "ds"))
    for shard in (data / "test").glob("*.h5"):
        write_rows(shard, "label", slice(None), 0)
    out = tmp_path / "run"
    proc = run_cmd(train_args(data, out, "--max-steps", "2"))
    why = "all 5 labels are 0: ROC AUC needs rows of both classes"
    assert f"test: acc 1.0000 auc undefined ({why})" in proc.stdout + proc.stderr
    assert "nan" not in (proc.stdout + proc.stderr).lower()
    summary = _strict_json((out / "summary.json").read_text())
    assert summary["final"]["test"]["auc"] is None and summary["final"]["test"]["auc_undefined"] == why
    assert "auc" not in summary["best"]["test"] and summary["best_test"] is None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)
    proc = run_cmd([EVAL, str(out / "checkpoint.pt"), "--data", str(data)])
    result = _strict_json(proc.stdout)
    assert result["auc"] is None and result["auc_undefined"] == why and result["rows"] == 5
    assert f"ROC AUC is undefined ({why})" in proc.stderr
