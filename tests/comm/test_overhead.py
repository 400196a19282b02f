"""CommOverheadLog takes each step's traffic from the backend and is the run's one source of
communication figures: per-step lines for every rank on rank 0 and the summary fields."""
from __future__ import annotations

import torch

from dqrm_mpi.comm.inprocess import run_ranks
from dqrm_mpi.comm.overhead import CommOverheadLog


def test_every_ranks_step_figures_reach_rank_0_and_the_summary():
    def rank_main(backend):
        log = CommOverheadLog(backend, flush_every=2)
        lines, steps = [], []
        for step in range(1, 4):
            # rank r sends (r + 1) * step float32 rows of 4 through an allgather: known bytes
            backend.allgather([torch.zeros((backend.rank + 1) * step, 4)], name=f"g{step}", kind="emb")
            steps.append(log.record_step(step))
            log.maybe_flush(step, lines.append if backend.rank == 0 else None)
        log.flush(lines.append if backend.rank == 0 else None)
        return lines, steps, log.summary_fields(), backend.traffic.take()["comm_bytes_sent"]

    results = run_ranks(2, rank_main)
    sent = {r: [16 * (r + 1) * s + 8 for s in (1, 2, 3)] for r in range(2)}  # + the int64 dim-0 count
    lines, _, fields, left = results[0]
    assert [line["step"] for line in lines] == [1, 2, 3] and left == 0
    for line, s in zip(lines, (1, 2, 3)):
        assert line["event"] == "comm"
        assert [rank["sent"] for rank in line["ranks"]] == [sent[0][s - 1], sent[1][s - 1]]
        assert [rank["by_kind"]["emb"]["sent"] for rank in line["ranks"]] == [sent[0][s - 1], sent[1][s - 1]]
    for r, (rank_lines, steps, rank_fields, _) in enumerate(results):
        assert [t["comm_bytes_sent"] for t in steps] == sent[r]
        assert rank_fields["comm_bytes_sent_per_step"]["mean"] == sum(sent[r]) / 3
        assert rank_fields["comm_bytes_received_per_step"]["mean"] == sum(sent[1 - r]) / 3
    per_rank = fields["comm_per_rank"]["per_rank"]
    assert [per_rank[str(r)]["sent"]["mean"] for r in range(2)] == [sum(sent[0]) / 3, sum(sent[1]) / 3]
    assert fields["comm_per_rank"]["max_over_ranks"]["sent"]["mean"] == sum(sent[1]) / 3
    assert results[1][0] == [] and results[1][2]["comm_per_rank"] is None
