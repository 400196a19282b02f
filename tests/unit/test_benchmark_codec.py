"""benchmarks/comm.py's codec benchmark runs the real exchanges over its in-process stand-in
backend (benchmarks/scaling.py measures its codec parts the same way): that stand-in must keep
up with the Collectives the exchanges call (start / wait included)."""
from __future__ import annotations

from benchmarks.comm import codec


def test_codec_benchmark_runs_the_exchanges_it_times():
    res = codec(world=2, steps=2, configs=["sparse_int8", "mlp_topk0.01_int8_ef"], batch=8)
    int8 = res["configs"]["sparse_int8"]
    assert int8["mlp_sent_bytes_per_step"] > 0 and int8["codec_ms_p50"] > 0
    topk = res["configs"]["mlp_topk0.01_int8_ef"]
    assert 0 < topk["mlp_sent_bytes_per_step"] < int8["mlp_sent_bytes_per_step"] / 10
