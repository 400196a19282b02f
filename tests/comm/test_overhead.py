"""CommOverheadLog takes each step's traffic from the backend and is the run's one source of
communication figures: per-window comm lines for every rank on rank 0, per-step
distributions in bounded memory, and the summary fields."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dqrm_mpi.comm.distribution import RATIO, StreamingDistribution
from dqrm_mpi.comm.inprocess import run_ranks
from dqrm_mpi.comm.overhead import CommOverheadLog

STEPS = 5


def _sent(rank: int, step: int) -> int:
    """Bytes rank ``rank`` sends at ``step``: (rank + 1) * step float32 rows of 4, plus the
    int64 dim-0 count of the allgather."""
    return 16 * (rank + 1) * step + 8


def test_windows_bring_every_ranks_figures_to_rank_0():
    def rank_main(backend):
        log = CommOverheadLog(backend, gather_every=2)
        lines, traffic, windows, early = [], [], [], None
        write = lines.append if backend.rank == 0 else None
        for step in range(1, STEPS + 1):
            backend.allgather([torch.zeros((backend.rank + 1) * step, 4)], name=f"g{step}", kind="emb")
            traffic.append(log.record_step(step))
            if step == 3:  # windows of steps 1-3 and 4-5
                windows.append(log.flush(write, attach=f"rank {backend.rank}"))
            else:
                log.maybe_gather()
            if step == 2 and backend.rank == 0:
                early = log.summary()  # gather_every=2: steps 1-2 are on rank 0 before their window closes
        windows.append(log.flush(write))
        return lines, traffic, windows, early, log.summary_fields(), backend.traffic.take()["comm_bytes_sent"]

    results = run_ranks(2, rank_main)
    lines, _, windows, early, fields, left = results[0]
    assert left == 0
    assert [(x["step"], x["first_step"], x["steps"]) for x in lines] == [(3, 1, 3), (5, 4, 2)]
    for line, steps in zip(lines, ([1, 2, 3], [4, 5])):
        assert line["event"] == "comm" and [x["rank"] for x in line["ranks"]] == [0, 1]
        for r, x in enumerate(line["ranks"]):
            mean_sent = np.mean([_sent(r, s) for s in steps])
            assert x["sent"] == x["by_kind"]["emb"]["sent"] == x["by_collective"]["emb/allgather"]["sent"] == mean_sent
            assert x["received"] == np.mean([_sent(1 - r, s) for s in steps])
            assert x["by_collective"]["emb/allgather"]["calls"] == 1
    assert windows[0].attached == ["rank 0", "rank 1"] and windows[0].ranks == lines[0]["ranks"]
    assert results[1][2] == [None, None], "only rank 0 gets the windows"
    every_step = {r: [_sent(r, s) for s in range(1, STEPS + 1)] for r in range(2)}
    assert early["per_rank"]["1"]["sent"]["mean"] == np.mean(every_step[1][:2])
    for r, (_, traffic, _, _, rank_fields, _) in enumerate(results):
        assert [t["comm_bytes_sent"] for t in traffic] == every_step[r]
        assert rank_fields["comm_bytes_sent_per_step"]["mean"] == np.mean(every_step[r])
        assert rank_fields["comm_bytes_received_per_step"]["mean"] == np.mean(every_step[1 - r])
    per_rank = fields["comm_per_rank"]["per_rank"]
    assert [per_rank[str(r)]["sent"]["mean"] for r in range(2)] == [np.mean(every_step[0]), np.mean(every_step[1])]
    assert per_rank["0"]["sent"]["p95"] == pytest.approx(max(every_step[0]), rel=0.005)
    assert fields["comm_per_rank"]["max_over_ranks"]["sent"]["mean"] == np.mean(every_step[1])
    assert results[1][4]["comm_per_rank"] is None


def test_one_step_windows_hold_each_steps_own_figures():
    def rank_main(backend):
        log = CommOverheadLog(backend)
        lines = []
        for step in (1, 2):
            backend.allgather([torch.zeros(3 * step, 4)], name=f"g{step}", kind="mlp")
            log.record_step(step)
            log.flush(lines.append)
        log.flush(lines.append)  # an empty window writes nothing
        return lines

    (lines,) = run_ranks(1, rank_main)
    assert [(x["step"], x["steps"]) for x in lines] == [(1, 1), (2, 1)]
    sent = [x["ranks"][0]["sent"] for x in lines]
    assert sent == [48 + 8, 96 + 8] and all(isinstance(s, int) for s in sent)


def test_streaming_distribution_mean_is_exact_and_percentiles_within_half_a_percent():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.lognormal(10, 2, 50_000), np.zeros(1_000), rng.integers(1, 5, 100)])
    d = StreamingDistribution()
    for chunk in np.array_split(rng.permutation(values), 7):
        d.add(chunk)
    assert d.count == len(values) and d.mean == pytest.approx(values.mean(), rel=1e-12)
    for q in (0.01, 0.5, 0.95, 0.999, 1.0):
        exact = np.percentile(values, 100 * q, method="inverted_cdf")
        assert d.quantile(q) == pytest.approx(exact, rel=(RATIO - 1) / 2 + 1e-9), q
    assert d.quantile(0.005) == 0.0  # among the zeros
    assert len(d.bins) < 4_000  # bounded by the range of the values, not their number
    assert set(d.summary()) == {"mean", "p50", "p95"}


def test_streaming_distribution_edge_cases():
    d = StreamingDistribution()
    assert d.summary() == {"mean": 0.0, "p50": 0.0, "p95": 0.0}
    d.add([7.0, 7.0, 7.0])
    assert d.summary() == {"mean": 7.0, "p50": 7.0, "p95": 7.0}  # clamped to the seen range
    with pytest.raises(ValueError, match=">= 0"):
        d.add([1.0, float("nan")])
    with pytest.raises(ValueError, match=">= 0"):
        d.add([-1.0])
