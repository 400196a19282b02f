"""`dqrm-train` with compression on 2 real ranks (launched with horovodrun from the test):
every rank's per-step communication figures reach metrics.jsonl and summary.json."""
from __future__ import annotations

import json

import pytest

from tests.conftest import horovodrun, run_cmd


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


@pytest.mark.slow
def test_topk_and_dense_embeddings_log_bytes_and_codec_time_per_step(small_dataset, tmp_path):
    out = tmp_path / "topk"
    horovodrun(2, ["dqrm-train", "--data", str(small_dataset), "--out", str(out), "--preset", "tiny",
                   "--batch-size", "256", "--max-steps", "4", "--eval-splits", "test",
                   "--mlp-compress", "topk:0.01+int8", "--emb-exchange", "dense"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    comm = [r for r in records if r.get("event") == "comm"]
    assert [r["step"] for r in comm] == [1, 2, 3, 4]
    for r in comm:
        for x in r["ranks"]:
            assert set(x["by_collective"]) == {"mlp/allgather", "emb/allreduce"}
            assert 0 < x["by_collective"]["mlp/allgather"]["sent"] < x["by_collective"]["emb/allreduce"]["sent"]
            assert x["codec_seconds"] > 0
    config = json.loads((out / "config.json").read_text())["train"]["compression"]
    assert (config["mlp"], config["emb_exchange"]) == ("topk:0.01+int8", "dense")


def test_a_compressor_on_one_rank_says_it_does_nothing(small_dataset, tmp_path):
    proc = run_cmd(["dqrm-train", "--data", str(small_dataset), "--out", str(tmp_path / "one"), "--preset", "tiny",
                    "--batch-size", "256", "--max-steps", "1", "--eval-splits", "test",
                    "--mlp-compress", "topk:0.01+int8"])
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "does nothing" in line]
    assert len(said) == 1 and said[0].endswith(  # after the log's timestamp
        "[dqrm-train] --mlp-compress topk:0.01+int8: a single rank exchanges no gradients, so this does nothing here")
