"""Profiles: the data, sizes and rank counts one reproduction runs at.

Every command a profile adds is run inside the report directory, so paths are
relative to it (``data`` is the prepared dataset, ``raw.txt`` a synthetic file).
``{raw}`` in a data command is the ``--raw`` path given to ``dqrm-repro run``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from data_prep.sources import kaggle_bounds


@dataclass(frozen=True)
class DataCommand:
    """One data-preparation command and the file it leaves when it has finished."""

    argv: tuple[str, ...]
    produces: str


@dataclass(frozen=True)
class Profile:
    """How big a reproduction is.

    paper: which of the paper's published numbers to print beside ours ("kaggle" or "terabyte").
    batch_size: GLOBAL batch (dqrm-train splits it across ranks).
    comm_ranks: ranks of the communication experiments (Tables 4 and 6, Figure 2c/2d).
    max_ranks: runs needing more ranks than this are not run (their cells say so).
    cluster: runs go to a cluster (a batch script is written) unless --hosts is given.
    eval_train_split: evaluate exported models on the train split too (Table 2's train loss).
    eval_splits: the splits every run evaluates; keep_best: dqrm-train --keep-best of every run
    (a split among eval_splits, or none).
    items: the tables and figures this profile runs (keys; empty: all); skip_runs: runs of those
    it leaves out (run names); the cells of the runs it does not run give ``scope_note``.
    """

    name: str
    description: str
    paper: str
    data: tuple[DataCommand, ...]
    preset: str
    batch_size: int
    epochs: int
    eval_every: int
    scale_period: int
    comm_ranks: int
    max_ranks: int
    lr: float = 0.1
    seed: int = 0
    max_steps: int | None = None
    needs_raw: bool = False
    cluster: bool = False
    eval_train_split: bool = True
    machine_note: str = "a 2-core machine"
    eval_splits: tuple[str, ...] = ("test",)
    keep_best: str = "none"
    items: tuple[str, ...] = ()
    skip_runs: tuple[str, ...] = ()
    scope_note: str = ""

    def train_flags(self) -> tuple[str, ...]:
        """The options every dqrm-train of this profile shares."""
        flags = ("--data", "data", "--preset", self.preset, "--batch-size", str(self.batch_size),
                 "--lr", str(self.lr), "--epochs", str(self.epochs), "--eval-every", str(self.eval_every),
                 *(a for split in self.eval_splits for a in ("--eval-splits", split)), "--seed", str(self.seed))
        flags += ("--keep-best", self.keep_best) if self.keep_best != "none" else ()
        return flags + (("--max-steps", str(self.max_steps)) if self.max_steps else ())

    def runs_item(self, key: str) -> bool:
        """Whether this profile runs the table or figure ``key``."""
        return not self.items or key in self.items

    def with_comm_ranks(self, ranks: int) -> "Profile":
        return replace(self, comm_ranks=ranks, max_ranks=max(self.max_ranks, ranks))

    def on_hosts(self, hosts: str) -> "Profile":
        """Runs may use every slot of a horovodrun host list such as ``a:4,b:4`` (8 ranks)."""
        try:
            slots = sum(int(h.rpartition(":")[2]) if ":" in h else 1 for h in hosts.split(","))
        except ValueError:
            raise ValueError(f"{hosts!r} is not a host list such as a:4,b:4") from None
        return replace(self, max_ranks=max(self.max_ranks, slots), machine_note=f"hosts {hosts}")


def quarter_epoch_steps(rows: int, batch_size: int) -> int:
    """A quarter of an epoch in steps on ``rows`` synthetic rows prepared by ``dqrm-prep criteo``
    (its training split: the Kaggle rule's first 6 of 7 parts) at ``batch_size``.  ValueError
    unless the epoch's steps divide by 4 (each quarter's evaluation then falls on the same
    place in every epoch, the last on its end)."""
    steps = kaggle_bounds(rows)[0] // batch_size
    if steps % 4:
        raise ValueError(f"{rows} rows at batch {batch_size}: {steps} steps per epoch do not divide by 4")
    return steps // 4


# The medium profile's scope: the tables and figures whose findings need scale.
MEDIUM_ITEMS = ("T1", "T2", "T5", "T7", "T8", "F1a", "F1cd", "F2a", "F2b", "F8")
MEDIUM_SCOPE = ("it runs the tables and figures whose findings need scale (T1, T2, T5's periods 1 and 200, T7, T8, "
                "F1a, F1cd, F2a, F2b, F8); T5's periods 500 and 1000 and the communication experiments run with "
                "the small profile (`make repro`)")


def _synth(rows: int, kind: tuple[str, ...], seed: int = 1) -> tuple[DataCommand, ...]:
    """``kind``: the synth options that pick the data, e.g. ("--profile", "criteo-like")."""
    return (DataCommand(("dqrm-prep", "synth", "raw.txt", "--rows", str(rows), *kind,
                         "--seed", str(seed), "--no-progress"), "raw.txt"),
            DataCommand(("dqrm-prep", "criteo", "raw.txt", "data", "--workers", "1", "--no-progress"),
                        "data/meta.json"))


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("smoke", "every table and figure end to end on tiny planted data (minutes; runs in `make test`)",
            paper="kaggle", data=_synth(4_000, ("--preset", "tiny")), preset="tiny", batch_size=256, epochs=2,
            eval_every=5, scale_period=200, comm_ranks=2, max_ranks=2),
    Profile("small", "the paper's qualitative effects on Criteo-like data (dqrm-prep synth --profile "
                     "criteo-like), Kaggle architecture (<= 2 h on 2 cores)",
            paper="kaggle", data=_synth(300_000, ("--profile", "criteo-like")), preset="kaggle", batch_size=128, epochs=3,
            eval_every=500, scale_period=200, comm_ranks=2, max_ranks=4),
    Profile("medium", "the paper's overfitting finding on 10 M Criteo-like rows (dqrm-prep synth --profile "
                      "criteo-like), Kaggle architecture, 4 epochs, test and val AUC every quarter epoch, one rank "
                      "(8 training runs of about 45-50 min each)",
            paper="kaggle", data=_synth(10_000_000, ("--profile", "criteo-like"), seed=3), preset="kaggle",
            batch_size=128, epochs=4, eval_every=quarter_epoch_steps(10_000_000, 128), scale_period=200,
            comm_ranks=2, max_ranks=1, eval_splits=("test", "val"), keep_best="val", items=MEDIUM_ITEMS,
            skip_runs=("dqrm4-period500", "dqrm4-period1000"), scope_note=MEDIUM_SCOPE),
    Profile("kaggle", "the paper's Kaggle settings on a real train.txt (--raw); 1 rank with global batch 512 "
                      "stands in for 4 workers except where gradients are compressed",
            paper="kaggle",
            data=(DataCommand(("dqrm-prep", "criteo", "{raw}", "data", "--no-progress"), "data/meta.json"),),
            preset="kaggle", batch_size=512, epochs=5, eval_every=10_000, scale_period=200,
            comm_ranks=4, max_ranks=4, needs_raw=True, machine_note="one machine"),
    Profile("terabyte", "the paper's Terabyte settings (--raw: the day_0..day_23 folder) on a cluster: "
                        "writes scripts/run_all.sh, or runs with --hosts",
            paper="terabyte",
            data=(DataCommand(("dqrm-prep", "criteo", "{raw}", "data", "--max-ind-range", "10000000",
                               "--sub-sample-rate", "0.875", "--no-progress"), "data/meta.json"),),
            preset="terabyte", batch_size=2048, epochs=1, eval_every=50_000, scale_period=1000,
            comm_ranks=4, max_ranks=8, needs_raw=True, cluster=True, eval_train_split=False,
            machine_note="the cluster"),
)}
