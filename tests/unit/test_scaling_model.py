"""The scaling model's formulas (benchmarks/scaling_model.py): bytes against what the real
exchanges hand to their collectives on simulated ranks, seconds on hand-computed cases."""
from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from benchmarks import scaling_model as sm
from dqrm_mpi.comm.inprocess import run_ranks
from dqrm_mpi.comm.sync import DenseExchange, SparseExchange
from dqrm_mpi.compression import get_compressor

DIM = 4


def _sent_by_collective(backend, kind: str) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for key, v in backend.traffic.take()["comm_breakdown"].items():
        k, coll = key.split("/")
        if k == kind:
            out[coll] += v["sent"]
    return dict(out)


def _plan_by_collective(plan: sm.Plan) -> dict[str, int]:
    out: dict[str, float] = defaultdict(float)
    for t in plan.transfers:
        out[t.collective] += t.sent_bytes
    return {k: round(v) for k, v in out.items()}


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("codec", ["none", "int8", "int4"])
@pytest.mark.parametrize("two_phase", [False, True])
def test_bytes_match_the_exchanges(n, codec, two_phase):
    """Each rank: 2n unique rows, two in each id range; n + 1 distinct rows per range over all
    ranks (n(n + 1) in the global batch).  MLP: one weight of 2n channels of 8 (two per chunk)."""
    rows = [15 * n, 15 * n]  # two tables; two-phase range k is ids [30k, 30k + 30)
    shapes = {"w": torch.Size([2 * n, 8])}
    dims = sm.Dims(mlp_values=16 * n, mlp_groups=2 * n, emb_dim=DIM, emb_tables=2)

    def rank(backend):
        c = get_compressor(codec)
        mlp = DenseExchange(backend, shapes, c, "channel", False, two_phase)
        emb = SparseExchange(backend, ["a", "b"], rows, DIM, c, "table", False, two_phase)
        r = backend.rank
        ids = torch.tensor(sorted(30 * k + r + j for k in range(n) for j in range(2)))
        mlp.exchange({"w": torch.randn(shapes["w"])})
        got_mlp = _sent_by_collective(backend, "mlp")
        emb.exchange(ids, torch.randn(len(ids), DIM))
        return got_mlp, _sent_by_collective(backend, "emb")

    for got_mlp, got_emb in run_ranks(n, rank):
        assert got_mlp == _plan_by_collective(sm.mlp_plan(codec, n, dims, two_phase))
        assert got_emb == _plan_by_collective(sm.emb_plan(codec, n, 2 * n, n * (n + 1), dims, two_phase))


DIMS = sm.Dims(mlp_values=1000, mlp_groups=10, emb_dim=4, emb_tables=2)
LINK = sm.Link(gbit=8.0, efficiency=1.0, latency_s=1e-6)  # 1e9 payload bytes/s
CALLS = sm.CallCost(allreduce=1e-3, allgather=2e-3, alltoall=3e-3)
NO_CODEC = sm.CodecCost(0.0, 0.0)


def _net(plan: sm.Plan) -> float:
    return sm.exchange_seconds(plan, LINK, CALLS, NO_CODEC)["network"]


def test_mlp_seconds_by_hand():
    # FP32: ring allreduce of 4000 B on 4 ranks: 2 * 3/4 * 4000 = 6000 B out, 6 steps
    assert _net(sm.mlp_plan("none", 4, DIMS, False)) == pytest.approx(1e-3 + 6000e-9 + 6e-6)
    # INT8 payload 1000 + 4 * 10 = 1040 B; allgather: 3 * 1040 B out, 3 steps
    assert _net(sm.mlp_plan("int8", 4, DIMS, False)) == pytest.approx(2e-3 + 3120e-9 + 3e-6)
    # two-phase: alltoall 3 chunks of 260 B; allgather of 3 x 260 B (its byte counts travel
    # alongside: no call or latency of their own)
    assert _net(sm.mlp_plan("int8", 4, DIMS, True)) == pytest.approx(3e-3 + 2e-3 + 2 * 780e-9 + 6e-6)
    # INT4: 500 + 40 B, FP32 ignores the collective setting
    assert sm.mlp_payload_bytes(DIMS, "int4") == 540
    assert sm.mlp_plan("none", 4, DIMS, True) == sm.mlp_plan("none", 4, DIMS, False)


def test_emb_seconds_by_hand():
    # INT8, 100 rows: 8 + 400 ids + 400 values + 8 scales = 816 B; allgather on 3 ranks (the
    # byte counts started with it: one call)
    assert sm.emb_message_bytes(100, DIMS, "int8") == 816
    assert _net(sm.emb_plan("int8", 3, 100, 300, DIMS, False)) == pytest.approx(2e-3 + 2 * 816e-9 + 2e-6)
    # two-phase, every rank touches the same 90 rows: 3 messages of 30 rows (8 + 120 + 120 + 8
    # = 256 B), 2 leave; the owner re-sends its 30 rows (256 B) to 2 ranks
    assert _net(sm.emb_plan("int8", 3, 90, 90, DIMS, True)) == pytest.approx(
        3e-3 + 2e-3 + (512 + 512) * 1e-9 + 4e-6)


def test_codec_seconds_by_hand():
    cost = sm.CodecCost(encode=1e-9, decode=2e-9, message=1e-5, fixed=1e-4)
    plan = sm.mlp_plan("int8", 4, DIMS, False)  # encode 1000, decode 4 x 1000, 4 messages
    s = sm.exchange_seconds(plan, LINK, CALLS, cost, cpu_slowdown=2.0)
    assert s["codec"] == pytest.approx(2 * (1e-4 + 1e-6 + 8e-6 + 4e-5))
    two = sm.mlp_plan("int8", 4, DIMS, True)  # encode 1000 + 250, decode 2000, 8 messages
    assert sm.codec_seconds(two.work, cost) == pytest.approx(1e-4 + 1.25e-6 + 4e-6 + 8e-5)


def test_two_phase_wins_when_ranks_share_rows():
    """Allgather: every rank receives every other's rows; two-phase: each row about twice."""
    ag = sm.emb_plan("int8", 8, 1000, 1000, DIMS, False)
    tp = sm.emb_plan("int8", 8, 1000, 1000, DIMS, True)
    assert tp.link_bytes < ag.link_bytes / 3
    fast = sm.Link(gbit=1000.0)
    cheap = sm.CallCost(0.0, 0.0, 0.0)
    by = {c: sm.exchange_seconds(sm.emb_plan("int8", 8, 1000, 1000, DIMS, c == "two-phase"), fast, cheap,
                                 NO_CODEC)["total"] for c in sm.COLLECTIVES}
    assert sm.better_collective(by) == "two-phase"
    # no rows shared and 2 ranks: two-phase only adds calls
    by = {c: sm.exchange_seconds(sm.emb_plan("int8", 2, 1000, 2000, DIMS, c == "two-phase"), LINK, CALLS,
                                 NO_CODEC)["total"] for c in sm.COLLECTIVES}
    assert sm.better_collective(by) == "allgather"


def test_switch_point():
    assert sm.switch_point({2: "allgather", 3: "two-phase", 4: "allgather", 5: "two-phase", 6: "two-phase"}) == 5
    assert sm.switch_point({2: "two-phase", 3: "two-phase"}) == 2
    assert sm.switch_point({2: "allgather", 3: "allgather"}) is None


def test_interpolate_rows():
    assert sm.interpolate_rows([10, 1000], [100, 10000], 10) == pytest.approx(100)
    assert sm.interpolate_rows([10, 1000], [100, 10000], 100) == pytest.approx(1000)  # log-log midpoint
    assert sm.interpolate_rows([1, 2], [1, 4], 4) == pytest.approx(8)  # beyond: slope capped at 1
    assert sm.interpolate_rows([1, 2], [1, 4], 1.5) == pytest.approx(1.5 ** 2)  # inside: as measured
    assert sm.interpolate_rows([1, 10, 100], [26, 200, 1000], 1000) == pytest.approx(5000)  # last slope (0.699)
    with pytest.raises(ValueError):
        sm.interpolate_rows([1], [1], 2)


def test_best_threshold():
    ag, tp = "allgather", "two-phase"
    ranks = [2, 3, 4, 5]
    # a: two-phase 10 % faster from 3 ranks; b: two-phase 20 % slower below 5 ranks, 2x faster at 5
    times = {("a", n): {ag: 1.0, tp: 1.0 if n < 3 else 0.9} for n in ranks}
    times |= {("b", n): {ag: 1.0, tp: 1.2 if n < 5 else 0.5} for n in ranks}
    # summed slowdown: k=2: b 0.6; k=3: b 0.4; k=4: a 0.111 + b 0.2; k=5: a 0.222; never: a 0.333 + b 1.0
    assert sm.best_threshold(times, ranks) == 5
    times |= {("a", n): {ag: 1.0, tp: 1.0 if n < 3 else 0.5} for n in ranks}  # a gains 2x from 3 ranks
    # k=3: b 0.4; k=4: a 1.0 + b 0.2; k=5: a 2.0
    assert sm.best_threshold(times, ranks) == 3
    never = {(c, n): {ag: 1.0, tp: 2.0} for c in "ab" for n in ranks}
    assert sm.best_threshold(never, ranks) == 6


def test_auto_switch_is_the_models_answer():
    """``--collective auto``'s two_phase_min_ranks is what the model says for the parts measured
    in benchmarks/scaling_parts.json.  After re-measuring (``benchmarks/scaling.py``, then copy
    OUT/parts.json there) this fails until the default follows the new answer."""
    from benchmarks.scaling import ROOT, predict
    from dqrm_mpi.compression import CompressionConfig

    parts = json.loads((ROOT / "benchmarks/scaling_parts.json").read_text())
    assert CompressionConfig().two_phase_min_ranks == predict(parts)["auto_two_phase_min_ranks"]
