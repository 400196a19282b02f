"""A planted click model that generates Criteo-like rows with a known ground truth.

Rows look like Criteo's: 13 integer features (heavy tailed, some negative, some
missing) and 26 categorical features drawn from Zipf distributions (id 0 stands for
a missing value).  The label is drawn from a known probability

    logit = bias + sum_t w_t[id_t] + sum_j v_j * (log1p(max(x_j, 0)) - m_j)
            + sum_{(s, t) in PAIRS} <e_s[id_s], e_t[id_t]>

so the planted model's own AUC and log loss on any split are an upper reference for
what training can reach (``planted_metrics``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .schema import (
    NUM_DENSE, NUM_SPARSE, SPLITS, DatasetMeta, shard_name, transform_dense, write_meta, write_shard,
)

# Pairs of tables whose planted vectors interact (dot products, like DLRM's interaction).
INTERACTING_PAIRS = ((0, 1), (2, 3), (4, 5), (1, 6), (7, 8))
INTERACTION_DIM = 4
DEFAULT_CARDINALITIES = (
    1000, 500, 5000, 3000, 300, 24, 2000, 600, 3, 4000, 1500, 5000, 1200,
    27, 3000, 4500, 10, 1500, 1000, 4, 5000, 18, 15, 2500, 105, 1400,
)


@dataclass(frozen=True)
class SyntheticBatch:
    """dense_raw int64 [n, 13] (0 where missing); dense_missing bool [n, 13];
    ids int64 [n, 26] (0 = missing); label uint8 [n]; prob float64 [n] (planted click probability)."""

    dense_raw: np.ndarray
    dense_missing: np.ndarray
    ids: np.ndarray
    label: np.ndarray
    prob: np.ndarray


class PlantedClickModel:
    """Deterministic generator: the same (seed, chunk index) always gives the same rows."""

    def __init__(
        self,
        cardinalities: tuple[int, ...] = DEFAULT_CARDINALITIES,
        seed: int = 0,
        target_ctr: float = 0.256,
        zipf_exponent: float = 1.1,
        dense_missing_rate: float = 0.15,
        sparse_missing_rate: float = 0.05,
        signal: float = 0.6,
    ) -> None:
        if len(cardinalities) != NUM_SPARSE:
            raise ValueError(f"expected {NUM_SPARSE} cardinalities, got {len(cardinalities)}")
        if min(cardinalities) < 2:
            raise ValueError(f"every cardinality must be >= 2 (id 0 is 'missing'), got {min(cardinalities)}")
        if not 0.0 < target_ctr < 1.0:
            raise ValueError(f"target_ctr must be in (0, 1), got {target_ctr}")
        self.cardinalities = tuple(int(c) for c in cardinalities)
        self.seed = int(seed)
        self.dense_missing_rate = dense_missing_rate
        self.sparse_missing_rate = sparse_missing_rate
        rng = np.random.default_rng([self.seed, 0x5EED])
        # Informative tables carry larger weights; the rest are mostly noise, as in real logs.
        table_scale = np.where(rng.random(NUM_SPARSE) < 0.5, 0.45, 0.08) * signal
        self.table_weights = [rng.normal(0.0, s, size=c) for s, c in zip(table_scale, self.cardinalities)]
        self.dense_scale = rng.uniform(1.0, 400.0, size=NUM_DENSE)
        self.dense_weights = rng.normal(0.0, 0.25, size=NUM_DENSE) * signal
        self.dense_mean = np.log1p(self.dense_scale) - 0.58  # E[log1p(Exp(s))] ~ log(s) - 0.58
        self.vectors = {
            t: rng.normal(0.0, 0.5 * np.sqrt(signal), size=(self.cardinalities[t], INTERACTION_DIM))
            for pair in INTERACTING_PAIRS for t in pair
        }
        # Zipf id distributions: rank r (1-based) has probability ~ r^-a over ids 1..c-1.
        self._cdfs = []
        for c in self.cardinalities:
            p = np.arange(1, c, dtype=np.float64) ** -zipf_exponent
            self._cdfs.append(np.cumsum(p / p.sum()))
        self._id_perm = [rng.permutation(np.arange(1, c)) for c in self.cardinalities]
        # Hashes: an odd multiplier and an offset per table make id -> hash a bijection mod 2^32.
        self._hash_mul = (rng.integers(1, 2**31, size=NUM_SPARSE, dtype=np.uint64) * 2 + 1)
        self._hash_add = rng.integers(0, 2**32, size=NUM_SPARSE, dtype=np.uint64)
        self.bias = 0.0
        self.bias = self._calibrate_bias(target_ctr)

    def _calibrate_bias(self, target_ctr: float) -> float:
        logit = self._logit(self._features(np.random.default_rng([self.seed, 0xB1A5]), 50_000))
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            ctr = np.mean(1.0 / (1.0 + np.exp(-(logit + mid))))
            lo, hi = (mid, hi) if ctr < target_ctr else (lo, mid)
        return (lo + hi) / 2

    def _features(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dense = np.floor(rng.exponential(self.dense_scale, size=(n, NUM_DENSE))).astype(np.int64)
        negative = rng.random((n, NUM_DENSE)) < 0.01
        dense[negative] = -rng.integers(1, 4, size=int(negative.sum()))
        missing = rng.random((n, NUM_DENSE)) < self.dense_missing_rate
        dense[missing] = 0
        ids = np.empty((n, NUM_SPARSE), dtype=np.int64)
        for t in range(NUM_SPARSE):
            rank = np.searchsorted(self._cdfs[t], rng.random(n), side="right")
            rank = np.minimum(rank, len(self._id_perm[t]) - 1)
            ids[:, t] = self._id_perm[t][rank]
        ids[rng.random((n, NUM_SPARSE)) < self.sparse_missing_rate] = 0
        return dense, missing, ids

    def _logit(self, features: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        dense, missing, ids = features
        x = transform_dense(dense).astype(np.float64)
        logit = self.bias + (x - self.dense_mean) @ self.dense_weights
        for t in range(NUM_SPARSE):
            logit += self.table_weights[t][ids[:, t]]
        for s, t in INTERACTING_PAIRS:
            logit += np.einsum("nd,nd->n", self.vectors[s][ids[:, s]], self.vectors[t][ids[:, t]])
        return logit

    def sample(self, n: int, chunk_index: int = 0) -> SyntheticBatch:
        """Rows of chunk ``chunk_index`` (deterministic in seed and chunk index)."""
        rng = np.random.default_rng([self.seed, 0xDA7A, int(chunk_index)])
        features = self._features(rng, n)
        prob = 1.0 / (1.0 + np.exp(-self._logit(features)))
        label = (rng.random(n) < prob).astype(np.uint8)
        return SyntheticBatch(features[0], features[1], features[2], label, prob)

    def category_hashes(self, table: int, ids: np.ndarray) -> np.ndarray:
        """32-bit hashes (uint64 holding values < 2^32) of ``ids`` in ``table``; distinct per id."""
        return (ids.astype(np.uint64) * self._hash_mul[table] + self._hash_add[table]) & np.uint64(0xFFFFFFFF)


def planted_metrics(label: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """AUC and log loss of the planted probabilities themselves (the best any model can do)."""
    from sklearn.metrics import log_loss, roc_auc_score

    out = {"rows": int(len(label)), "ctr": float(np.mean(label)) if len(label) else 0.0}
    if len(np.unique(label)) == 2:
        out["auc"] = float(roc_auc_score(label, prob))
        out["log_loss"] = float(log_loss(label, np.clip(prob, 1e-7, 1 - 1e-7)))
    return out


def write_synthetic_dataset(
    out: str | Path,
    rows: dict[str, int],
    model: PlantedClickModel | None = None,
    shard_rows: int = 65536,
) -> DatasetMeta:
    """Write a dataset directory straight from the planted model (no raw text, no prep).

    Ids are used as they are (0..cardinality-1); ``meta.extra['planted']`` holds the
    planted model's metrics per split.  For the raw Criteo-format file use ``dqrm-prep synth``.
    """
    model = model or PlantedClickModel()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    planted, chunk_index, positives = {}, 0, 0
    for split in SPLITS:
        n = int(rows.get(split, 0))
        labels, probs = [], []
        for part, start in enumerate(range(0, n, shard_rows)):
            b = model.sample(min(shard_rows, n - start), chunk_index)
            chunk_index += 1
            write_shard(out / split / shard_name(part), transform_dense(b.dense_raw),
                        b.ids.astype(np.int32), b.label.astype(np.float32))
            labels.append(b.label)
            probs.append(b.prob)
        if n:
            planted[split] = planted_metrics(np.concatenate(labels), np.concatenate(probs))
            if split == "train":
                positives = int(np.concatenate(labels).sum())
    meta = DatasetMeta(
        cardinalities=list(model.cardinalities),
        rows={s: int(rows.get(s, 0)) for s in SPLITS},
        ctr=positives / max(1, int(rows.get("train", 0))),
        options={"generator": "planted", "seed": model.seed, "shard_rows": shard_rows},
        extra={"planted": planted},
    )
    write_meta(out, meta)
    return meta
