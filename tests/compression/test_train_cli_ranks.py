"""`dqrm-train` with compression on 2 real ranks (launched with horovodrun from the test):
every rank's per-step communication figures reach metrics.jsonl and summary.json."""
from __future__ import annotations

import json

import pytest

from tests.conftest import horovodrun


@pytest.mark.slow
def test_compressed_run_logs_every_ranks_overhead(small_dataset, tmp_path):
    out = tmp_path / "run"
    proc = horovodrun(2, ["dqrm-train", "--data", str(small_dataset), "--out", str(out), "--preset", "tiny",
                          "--batch-size", "256", "--max-steps", "12", "--emb-compress", "int4",
                          "--mlp-compress", "int8", "--error-feedback", "both", "--collective", "two-phase"])
    assert "communication per step and rank" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    comm = [r for r in records if r.get("event") == "comm"]
    assert [r["step"] for r in comm] == list(range(1, 13))
    for r in comm:
        assert [x["rank"] for x in r["ranks"]] == [0, 1]
        for x in r["ranks"]:
            assert set(x["by_kind"]) == {"emb", "mlp"}
            assert {"emb/alltoall", "emb/allgather", "mlp/alltoall", "mlp/allgather"} == set(x["by_collective"])
            assert x["sent"] == sum(v["sent"] for v in x["by_collective"].values()) > 0
        # what one rank sent by alltoall to the other is what the other received from it
        a, b = r["ranks"]
        assert a["by_collective"]["mlp/alltoall"]["sent"] == b["by_collective"]["mlp/alltoall"]["received"]
    summary = json.loads((out / "summary.json").read_text())
    per_rank = summary["comm_per_rank"]["per_rank"]
    assert set(per_rank) == {"0", "1"}
    for m in per_rank.values():
        assert set(m["sent"]) == {"mean", "p50", "p95"} and m["emb.sent"]["mean"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["compression"]["emb"] == "int4"
