"""The criteo-like generator: rows whose statistics are calibrated to real Criteo Kaggle.

Statistics come from ``criteo_like_table.TABLE`` (made by ``criteo_calibration`` from the
real rows and the documented full-data cardinalities; never from a training result):

* categorical column t: missing with its measured share (columns that went missing
  together in the real rows go missing together); else rank 0 with the measured top
  share, ranks k = 1..V-1 with p ~ (k + q)^-a: exact for k <= HEAD, a continuous tail
  above (so a 10 M-value column costs no memory).  Distinct values then grow with the
  row count as the real column's do.
* dense column j: missing share, negative share and values, and log1p(x) ~ N(mu, sigma)
  with the real p50 / p90 of the non-negative values.
* time: the file is 7 equal "days" (Kaggle's split).  Each day the popularity of the
  HEAD most frequent values drifts (log-popularity random walk, DRIFT_SIGMA per day;
  the value that holds rank k changes, the rank's share does not), and in columns of
  more than 10 * HEAD values a share BIRTH_RATE of them is replaced by values never
  seen before.  The rare tail keeps bringing new values, as in Heaps' law.
* clicks: logit = bias + scale * (sum_t c_t e_t(value) + sum_j v_j z_j
  + 0.5 sum_pairs <u_s(value), u_t(value)>), with heavy-tailed per-value effects
  e ~ Student-t(2) (a few values per column dominate), derived from a hash of
  (seed, column, value) so no table is stored.  bias sets the CTR to Kaggle's 25.6 %;
  scale sets the planted model's own test-day AUC to PLANTED_AUC.

DRIFT_SIGMA, BIRTH_RATE, the click model's form and PLANTED_AUC are assumptions (the
1,999 real rows are one short moment and cannot measure drift or per-value effects).
"""
from __future__ import annotations

import numpy as np

from dqrm_mpi.data.schema import NUM_DENSE, NUM_SPARSE
from dqrm_mpi.data.synthetic import INTERACTING_PAIRS, SyntheticBatch

from .criteo_like_table import TABLE
from .criteo_stats import DENSE_NAMES, SPARSE_NAMES

DAYS = 7
HEAD = 1024  # ranks 0..HEAD sampled exactly and drifting; above, the continuous tail
DRIFT_SIGMA = 0.3  # std of the daily change of a head value's log-popularity
BIRTH_RATE = 0.02  # share of head values replaced by new ones each day (large columns)
PLANTED_AUC = 0.81  # planted AUC on the test day: just above the best Kaggle AUC in the reference doc (0.8073)
EFFECT_CLIP = 10.0
INTERACTION_DIM = 4  # four 16-bit uniforms per 64-bit hash
CALIBRATION_ROWS_PER_DAY = 8192
TAIL, MISSING = -1, -2  # codes in the head-rank array of a row's values
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """uint64 -> well-mixed uint64 (vectorised splitmix64 finaliser)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def _hash_uniform(key: np.uint64, ids: np.ndarray) -> np.ndarray:
    """Uniform (0, 1) float64 per id (uint64 array), a fixed function of (key, id)."""
    h = _splitmix64(ids ^ key)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _hash_uniforms16(key: np.uint64, ids: np.ndarray) -> np.ndarray:
    """Four uniforms (0, 1) per id from one hash, float64 [n, 4] (16-bit resolution)."""
    h = _splitmix64(ids ^ key)
    fields = h[:, None] >> np.array([0, 16, 32, 48], dtype=np.uint64) & np.uint64(0xFFFF)
    return (fields.astype(np.float64) + 0.5) / 65536.0


class Column:
    """Sampling of one categorical column: ranks, then day-dependent rank -> value id."""

    def __init__(self, spec: dict, rng: np.random.Generator) -> None:
        self.top, self.a, self.q = float(spec["top_share"]), float(spec["a"]), float(spec["q"])
        self.vocab = int(spec["vocab"])
        head = min(self.vocab - 1, HEAD)
        w = (np.arange(1, head + 1, dtype=np.float64) + self.q) ** -self.a
        self.tail_lo, self.tail_hi = head + 0.5, self.vocab - 0.5
        tail = self._tail_integral(self.tail_hi) - self._tail_integral(self.tail_lo) if self.vocab - 1 > head else 0.0
        z = w.sum() + tail
        p_head = np.concatenate([[self.top], (1.0 - self.top) * w / z])
        self.cdf = np.cumsum(p_head)  # ranks 0..head; beyond cdf[-1]: the tail
        self.day_ids = self._drifted_ids(np.log(p_head), rng)  # int64 [DAYS, head + 1]
        self.max_id = int(max(self.vocab, self.day_ids.max()))

    def _tail_integral(self, x: float | np.ndarray):
        """Antiderivative of the tail density (x + q)^-a (unnormalised), at rank offset x."""
        if abs(self.a - 1.0) < 1e-9:
            return np.log(x + self.q)
        return (x + self.q) ** (1.0 - self.a) / (1.0 - self.a)

    def _drifted_ids(self, log_p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Value id holding each head rank on each day (day 0: rank k -> id k + 1)."""
        ids = np.arange(1, len(log_p) + 1, dtype=np.int64)
        score = log_p.copy()
        births = self.vocab > 10 * HEAD
        next_id = self.vocab + 1
        out = np.empty((DAYS, len(log_p)), dtype=np.int64)
        out[0] = ids
        for day in range(1, DAYS):
            score = score + rng.normal(0.0, DRIFT_SIGMA, size=len(score))
            if births:
                born = np.flatnonzero(rng.random(len(ids)) < BIRTH_RATE)
                ids[born] = np.arange(next_id, next_id + len(born))
                next_id += len(born)
            out[day] = ids[np.argsort(-score, kind="stable")]
        return out

    def sample(self, u: np.ndarray, day: int) -> tuple[np.ndarray, np.ndarray]:
        """(value ids >= 1, head rank or TAIL) int64 [n] for uniforms ``u`` [n] on ``day``."""
        rank = np.searchsorted(self.cdf, u, side="right")
        out = self.day_ids[day].take(np.minimum(rank, len(self.cdf) - 1))
        tail = rank == len(self.cdf)
        if tail.any():
            v = (u[tail] - self.cdf[-1]) / max(1e-300, 1.0 - self.cdf[-1])
            lo, hi = self._tail_integral(self.tail_lo), self._tail_integral(self.tail_hi)
            y = lo + np.clip(v, 0.0, 1.0) * (hi - lo)
            if abs(self.a - 1.0) < 1e-9:
                x = np.exp(y) - self.q
            else:
                x = (y * (1.0 - self.a)) ** (1.0 / (1.0 - self.a)) - self.q
            out[tail] = np.clip(np.rint(x), len(self.cdf), self.vocab - 1) + 1
            rank[tail] = TAIL
        return out, rank


class CriteoLikeModel:
    """Deterministic criteo-like rows of a file of ``rows`` lines: the same (seed, start, n)
    always gives the same rows."""

    def __init__(self, rows: int, seed: int = 0, table: dict = TABLE, planted_auc: float = PLANTED_AUC) -> None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.rows, self.seed = int(rows), int(seed)
        rng = np.random.default_rng([self.seed, 0xC417E0])
        self.columns = [Column(table["sparse"][name], rng) for name in SPARSE_NAMES]
        self.cardinalities = tuple(c.max_id + 1 for c in self.columns)
        dense = [table["dense"][name] for name in DENSE_NAMES]
        self.mu = np.array([d["log1p_mu"] for d in dense])
        self.sigma = np.array([d["log1p_sigma"] for d in dense])
        self.negative = [(np.array([int(v) for v in d["negative_values"]], dtype=np.int64),
                          np.array(list(d["negative_values"].values()))) for d in dense]
        # Missingness: one draw per group of columns that go missing together.
        names = list(DENSE_NAMES) + list(SPARSE_NAMES)
        grouped = {n: g for g in table["missing_groups"] for n in g}
        self.missing_groups, seen = [], set()
        for n in names:
            g = grouped.get(n, [n])
            if g[0] in seen:
                continue
            seen.add(g[0])
            spec = table["dense"].get(g[0]) or table["sparse"][g[0]]
            if spec["missing"] > 0:
                self.missing_groups.append(([names.index(m) for m in g], float(spec["missing"])))
        # Click model.
        self.column_weight = np.exp(rng.normal(0.0, 0.5, size=NUM_SPARSE))
        self.dense_weight = rng.normal(0.0, 0.3, size=NUM_DENSE)
        self._keys = _splitmix64(rng.integers(0, 2**63, size=(NUM_SPARSE, 3), dtype=np.int64).astype(np.uint64))
        self._hash_mul = rng.integers(1, 2**31, size=NUM_SPARSE, dtype=np.uint64) * 2 + 1
        self._hash_add = rng.integers(0, 2**32, size=NUM_SPARSE, dtype=np.uint64)
        self._head_effect = self._head_tables(self._value_effect)
        self._head_vectors = self._head_tables(self._vectors)
        self.scale, self.bias = self._calibrate(float(table["ctr"]), planted_auc)

    def day_of(self, row: np.ndarray) -> np.ndarray:
        """Day (0..6) of file lines ``row``: 7 equal consecutive days, as the Kaggle split."""
        per, extra = divmod(self.rows, DAYS)
        starts = np.cumsum([0] + [per + 1] * extra + [per] * (DAYS - extra))[1:]
        return np.searchsorted(starts, row, side="right")

    def _draw(self, rng: np.random.Generator, n: int, day: int) -> tuple[np.ndarray, ...]:
        """Features of n rows of ``day``: dense int64 [n, 13] (0 where missing), dense missing
        bool [n, 13], value ids int64 [n, 26] (0 = missing), and the head rank of each value
        int64 [n, 26] (or TAIL, MISSING)."""
        missing = np.zeros((n, NUM_DENSE + NUM_SPARSE), dtype=bool, order="F")  # filled column by column
        for cols, rate in self.missing_groups:
            missing[:, cols] = (rng.random(n) < rate)[:, None]
        dense = np.rint(np.expm1(rng.normal(self.mu, self.sigma, size=(n, NUM_DENSE)))).astype(np.int64)
        np.maximum(dense, 0, out=dense)
        for j, (values, shares) in enumerate(self.negative):
            if len(values):
                u = rng.random(n)
                pick = np.searchsorted(np.cumsum(shares), u, side="right")
                neg = pick < len(values)
                dense[neg, j] = values[pick[neg]]
        dense_missing = missing[:, :NUM_DENSE]
        dense[dense_missing] = 0
        ids = np.empty((n, NUM_SPARSE), dtype=np.int64, order="F")
        rank = np.empty((n, NUM_SPARSE), dtype=np.int64, order="F")
        for t, col in enumerate(self.columns):
            ids[:, t], rank[:, t] = col.sample(rng.random(n), day)
        sparse_missing = missing[:, NUM_DENSE:]
        ids[sparse_missing] = 0
        rank[sparse_missing] = MISSING
        return dense, dense_missing, ids, rank

    def _effects(self, dense: np.ndarray, ids: np.ndarray, day: int, rank: np.ndarray) -> np.ndarray:
        """The click model's logit before bias and scale, float64 [n], for rows of ``day``;
        head values' terms come from the per-day tables, the others are hashed."""
        z = (np.log1p(np.maximum(dense, 0)) - self.mu) / self.sigma
        out = z @ self.dense_weight
        for t in range(NUM_SPARSE):
            out += self.column_weight[t] * self._lookup(self._head_effect[t], self._value_effect, t, ids[:, t],
                                                        day, rank[:, t])
        for s, t in INTERACTING_PAIRS:
            u = self._lookup(self._head_vectors[s], self._vectors, s, ids[:, s], day, rank[:, s])
            v = self._lookup(self._head_vectors[t], self._vectors, t, ids[:, t], day, rank[:, t])
            out += 0.5 * np.einsum("nd,nd->n", u, v)
        return out

    @staticmethod
    def _lookup(head_table: np.ndarray, by_hash, t: int, ids: np.ndarray, day: int, rank: np.ndarray) -> np.ndarray:
        """Per-value terms [n, ...]: ``head_table[day, rank]`` for head values (its last
        column: the missing value), ``by_hash`` for tail values."""
        table = head_table[day]
        out = table.take(np.where(rank == MISSING, len(table) - 1, np.maximum(rank, 0)), axis=0)
        tail = rank == TAIL
        if tail.any():
            out[tail] = by_hash(t, ids[tail].astype(np.uint64))
        return out

    def _value_effect(self, t: int, ids: np.ndarray) -> np.ndarray:
        """Heavy-tailed per-value effect (Student-t with 2 degrees of freedom, clipped), [n]."""
        u = _hash_uniform(self._keys[t, 0], ids)
        return np.clip((2 * u - 1) / np.sqrt(2 * u * (1 - u)), -EFFECT_CLIP, EFFECT_CLIP)

    def _vectors(self, t: int, ids: np.ndarray) -> np.ndarray:
        """N(0, 1) vectors [n, INTERACTION_DIM] per value (Box-Muller on hashed uniforms)."""
        u1, u2 = _hash_uniforms16(self._keys[t, 1], ids), _hash_uniforms16(self._keys[t, 2], ids)
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)

    def _head_tables(self, fn) -> list[np.ndarray]:
        """Per column: fn's terms of the head values of each day, then of the missing value,
        float64 [DAYS, head + 2, ...]."""
        tables = []
        for t, col in enumerate(self.columns):
            ids = np.concatenate([col.day_ids, np.zeros((DAYS, 1), dtype=np.int64)], axis=1)
            flat = fn(t, ids.reshape(-1).astype(np.uint64))
            tables.append(flat.reshape(ids.shape + flat.shape[1:]))
        return tables

    def _calibrate(self, ctr: float, auc: float) -> tuple[float, float]:
        """(scale, bias) giving mean click probability ``ctr`` over all days and expected
        AUC ``auc`` of the planted probabilities on the last day."""
        rng = np.random.default_rng([self.seed, 0xCA1])
        effect = []
        for day in range(DAYS):
            dense, _, ids, rank = self._draw(rng, CALIBRATION_ROWS_PER_DAY, day)
            effect.append(self._effects(dense, ids, day, rank))
        last = np.sort(effect[-1])
        effect = np.concatenate(effect)

        def bias_for(scale: float) -> float:
            lo, hi = -30.0, 30.0
            for _ in range(50):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if np.mean(_sigmoid(mid + scale * effect)) < ctr else (lo, mid)
            return (lo + hi) / 2

        lo, hi = 0.0, 5.0
        for _ in range(30):
            mid = (lo + hi) / 2
            p = _sigmoid(bias_for(mid) + mid * last)
            lo, hi = (mid, hi) if expected_auc(p) < auc else (lo, mid)
        scale = (lo + hi) / 2
        return scale, bias_for(scale)

    def sample_rows(self, start: int, n: int) -> SyntheticBatch:
        """File lines start..start+n-1."""
        rng = np.random.default_rng([self.seed, 0xDA7A, int(start)])
        day = self.day_of(np.arange(start, start + n))
        parts = []
        for d in np.unique(day):
            k = int(np.count_nonzero(day == d))
            dense, dense_missing, ids, rank = self._draw(rng, k, int(d))
            prob = _sigmoid(self.bias + self.scale * self._effects(dense, ids, int(d), rank))
            parts.append((dense, dense_missing, ids, prob))
        dense, dense_missing, ids, prob = (np.concatenate(x) for x in zip(*parts))
        label = (rng.random(n) < prob).astype(np.uint8)
        return SyntheticBatch(dense, dense_missing, ids, label, prob)

    def category_hashes(self, table: int, ids: np.ndarray) -> np.ndarray:
        """32-bit hashes (uint64 holding values < 2^32) of ``ids`` in ``table``; distinct per id."""
        return (ids.astype(np.uint64) * self._hash_mul[table] + self._hash_add[table]) & np.uint64(0xFFFFFFFF)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def expected_auc(prob_sorted: np.ndarray) -> float:
    """Expected AUC of scores ordered like ``prob_sorted`` (ascending) when each row is
    positive with its probability: P(score of a positive > score of a negative)."""
    neg_below = np.cumsum(1.0 - prob_sorted) - (1.0 - prob_sorted)
    return float(np.sum(prob_sorted * neg_below) / (prob_sorted.sum() * (1.0 - prob_sorted).sum()))
