"""The Horovod backend over simulated ranks (threads): what each collective returns, in
which order, and the bytes it counts.  ``collectives_scenario`` also runs on real ranks
(tests/mpi/test_backend.py), where its results must equal the simulated ones."""
from __future__ import annotations

import pytest
import torch

from dqrm_mpi.comm.inprocess import run_ranks


def collectives_scenario(backend) -> dict:
    """Every step collective with uneven, rank-dependent inputs; returns what this rank got."""
    r, size = backend.rank, backend.size
    backend.traffic.take()
    avg = backend.allreduce_average([torch.full((3, 2), float(r)), torch.arange(4.0) * (r + 1)], "s.avg", "a")
    # dim 0 differs per rank: rank r sends r + 1 rows
    gathered = backend.allgather([torch.full((r + 1, 2), float(r)), torch.arange(r + 2, dtype=torch.int64)],
                                 "s.gather", "b")
    stacked = backend.allgather_stacked(torch.full((5,), r, dtype=torch.uint8), "s.stacked", "b")
    # rank r sends d + r rows to rank d, each row [r, d, i]
    rows = [torch.tensor([[r, d, i] for i in range(d + r)], dtype=torch.int32).reshape(-1, 3) for d in range(size)]
    received, splits = backend.alltoall(torch.cat(rows), [d + r for d in range(size)], "s.a2a", "c")
    return {"avg": avg, "gathered": gathered, "stacked": stacked, "received": received, "splits": splits,
            "traffic": backend.traffic.take()["comm_breakdown"]}


@pytest.mark.parametrize("size", [2, 3])
def test_collectives_return_rank_ordered_parts_and_count_bytes(size):
    results = run_ranks(size, collectives_scenario)
    mean = sum(range(size)) / size
    for r, got in enumerate(results):
        torch.testing.assert_close(got["avg"][0], torch.full((3, 2), mean))
        torch.testing.assert_close(got["avg"][1], torch.arange(4.0) * (mean + 1))
        floats, ints = got["gathered"]
        assert [p.shape[0] for p in floats] == list(range(1, size + 1))
        assert all(torch.equal(p, torch.full((q + 1, 2), float(q))) for q, p in enumerate(floats))
        assert all(torch.equal(p, torch.arange(q + 2)) for q, p in enumerate(ints))
        assert torch.equal(got["stacked"], torch.arange(size, dtype=torch.uint8).unsqueeze(1).expand(size, 5))
        assert got["splits"] == [r + s for s in range(size)]
        expected = [[s, r, i] for s in range(size) for i in range(r + s)]
        assert got["received"].tolist() == expected
        t = got["traffic"]
        assert t["a/allreduce"]["sent"] == t["a/allreduce"]["received"] == 4 * (6 + 4)
        own = 4 * 2 * (r + 1) + 8 * (r + 2) + 8 * 2  # two tensors plus their int64 dim-0 counts
        everyone = sum(4 * 2 * (q + 1) + 8 * (q + 2) + 8 * 2 for q in range(size))
        assert t["b/allgather"]["sent"] == own + 5  # + the stacked uint8 [5]
        assert t["b/allgather"]["received"] == everyone - own + 5 * (size - 1)
        assert t["b/allgather"]["calls"] == 2
        row = 3 * 4
        assert t["c/alltoall"]["sent"] == row * sum(d + r for d in range(size) if d != r)
        assert t["c/alltoall"]["received"] == row * sum(r + s for s in range(size) if s != r)


def test_set_up_collectives_are_not_counted():
    def scenario(backend):
        torch.manual_seed(backend.rank)
        module = torch.nn.Linear(3, 2)
        module.register_buffer("counter", torch.tensor(10 + backend.rank))
        backend.broadcast_module(module, root=1)
        obj = backend.broadcast_object({"rank": backend.rank}, root=1)
        objs = backend.allgather_object(backend.rank * 10)
        arr = backend.allgather_array(torch.arange(backend.rank + 1), name="arr")
        backend.barrier()
        return module.state_dict(), obj, objs, arr, backend.traffic.take()["comm_bytes_sent"]

    results = run_ranks(3, scenario)
    for state, obj, objs, arr, sent in results:
        assert all(torch.equal(v, results[1][0][k]) for k, v in state.items())
        assert int(state["counter"]) == 11 and obj == {"rank": 1} and objs == [0, 10, 20]
        assert arr.tolist() == [0, 0, 1, 0, 1, 2] and sent == 0


def test_integers_are_never_allreduced():
    with pytest.raises(TypeError, match="never sum quantized integers"):
        run_ranks(2, lambda b: b.allreduce_average([torch.ones(3, dtype=torch.int8)], "q", "mlp"))


def test_ranks_issuing_different_collectives_fail_instead_of_hanging():
    def scenario(backend):
        return backend.allreduce_average([torch.ones(2)], f"grad.{backend.rank}", "mlp")

    with pytest.raises(RuntimeError, match="different collectives"):
        run_ranks(2, scenario)


def test_a_failing_rank_stops_its_peers_and_its_error_is_raised():
    def scenario(backend):
        if backend.rank == 1:
            raise KeyError("rank 1 broke")
        backend.barrier()

    with pytest.raises(KeyError, match="rank 1 broke"):
        run_ranks(3, scenario)
