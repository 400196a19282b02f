"""When a run evaluates: every --eval-every steps and at each epoch end, each step once."""
from __future__ import annotations

from collections import Counter

from dqrm_mpi.comm.inprocess import run_ranks
from dqrm_mpi.train.config import TrainConfig
from dqrm_mpi.train.loop import train
from dqrm_mpi.train.run_dir import read_metrics


def _eval_steps(data, out, **options) -> Counter:
    config = TrainConfig(data=data, out=out, preset="tiny", batch_size=400, seed=5, threads=1, **options)
    run_ranks(1, lambda backend: train(config, backend))
    return Counter((r["split"], r["step"]) for r in read_metrics(out) if r["event"] == "eval")


def test_a_step_that_ends_an_epoch_and_an_interval_is_evaluated_once(small_dataset, tmp_path):
    # 12,000 rows / 400 = 30 steps per epoch: steps 30 and 60 end an epoch and an interval of 15
    evals = _eval_steps(small_dataset, tmp_path / "run", epochs=2, eval_every=15)
    assert evals == Counter({(split, step): 1 for split in ("test", "val") for step in (15, 30, 45, 60)})


def test_an_interval_that_does_not_divide_the_epoch_adds_the_epoch_ends(small_dataset, tmp_path):
    evals = _eval_steps(small_dataset, tmp_path / "run", epochs=2, eval_every=20, eval_splits=("test",))
    assert evals == Counter({("test", step): 1 for step in (20, 30, 40, 60)})
