"""`dqrm-train --overlap` against `--no-overlap` on 2 real ranks (horovodrun from the test):
the final checkpoints are bit-identical, and every step line carries the exchange's span
and the part of it the step waited for."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import horovodrun


@pytest.mark.slow
def test_overlap_flag_keeps_the_numbers_and_logs_exchange_and_waited_time(small_dataset, tmp_path):
    models, lines = {}, {}
    for flag in ("--overlap", "--no-overlap"):
        out = tmp_path / flag.strip("-")
        horovodrun(2, ["dqrm-train", "--data", str(small_dataset), "--out", str(out), "--preset", "tiny",
                       "--batch-size", "256", "--max-steps", "5", "--eval-splits", "test", "--log-every", "1",
                       "--emb-compress", "int8", "--mlp-compress", "int8", "--error-feedback", "both",
                       "--bucket-mb", "0.002", flag])
        models[flag] = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        lines[flag] = [r for r in records if r.get("event") == "step"]
        config = json.loads((out / "config.json").read_text())["train"]["compression"]
        assert (config["overlap"], config["bucket_bytes"]) == (flag == "--overlap", int(0.002 * 2**20))
        summary = json.loads((out / "summary.json").read_text())
        assert 0 < summary["step_time"]["exchange_waited"] <= summary["step_time"]["exchange_span"]
        assert summary["waited_seconds_per_step"]["mean"] > 0
    assert models["--overlap"].keys() == models["--no-overlap"].keys()
    assert all(torch.equal(models["--overlap"][k], models["--no-overlap"][k]) for k in models["--overlap"])
    for flag, steps in lines.items():
        assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
        for r in steps:  # the step's time on the exchange is part of the exchange's span
            assert 0 < r["waited_seconds"] <= r["exchange_seconds"]
            if flag == "--no-overlap":
                assert r["waited_seconds"] == r["exchange_seconds"]
