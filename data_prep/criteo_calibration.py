"""Calibration of the criteo-like generator to real Criteo Kaggle statistics.

Sources (nothing here is tuned toward a training result):

* the first 1,999 rows of Kaggle ``train.txt`` (``tests/data/criteo_kaggle_train_head1999.tsv``):
  per-column missing shares and which columns go missing together, top-value shares,
  distinct values and singleton values in those rows, dense negative shares and
  quantiles (measured by ``criteo_stats``);
* the full-data facts of ``docs/dqrm-reference.md``: 45,840,617 rows, CTR 25.6 %, and the
  reference DLRM's per-column cardinalities over all of them (missing counts as a value).

Each categorical column is modelled as: missing with its measured share; otherwise
rank 1 with the measured top-value share, and ranks 2..V Zipf-Mandelbrot,
p(r) ~ (r - 1 + q)^-a.  (a, q, V) are fitted so that the model's *expected* number of
distinct values after the real 1,999 rows and after all 45.8 M rows, and its expected
singletons after 1,999 rows, equal the measured ones (rank 1 kept below the top share).
This reproduces each column's Heaps-law growth between the two real points
(distinct(n) ~ K n^beta) and its saturation at the full-data cardinality for small columns.

Run ``python -m data_prep.criteo_calibration [ROWS_FILE]`` to regenerate
``criteo_like_table.py`` (a test checks that the committed table is what this gives).
"""
from __future__ import annotations

import math
import pprint
import sys
from pathlib import Path

import numpy as np

from dqrm_mpi.data.schema import write_atomic_text

from .criteo_stats import DENSE_NAMES, SPARSE_NAMES, file_stats, read_columns

KAGGLE_ROWS = 45_840_617  # Kaggle train.txt lines (reference doc, "Criteo data")
KAGGLE_CTR = 0.256  # share of clicks in Kaggle train.txt (reference doc)
# Per-column distinct values over all of Kaggle train.txt, missing counted as a value
# (reference doc, "Kaggle cardinalities"; the reference DLRM's counts, whose dictionaries
# span all 7 days of train.txt; the doc's "33,762,577 rows" is their sum, embedding rows).
KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
REAL_ROWS_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "criteo_kaggle_train_head1999.tsv"
TABLE_FILE = Path(__file__).with_name("criteo_like_table.py")
MAX_VOCAB = 2**31  # value ids must stay distinct as 32-bit hashes
HEAD_EXACT = 1024  # ranks up to this are summed one by one; above, in log-spaced bins


def rank_bins(v: float) -> tuple[np.ndarray, np.ndarray]:
    """Ranks 2..V of the Zipf-Mandelbrot part as (centre offset r-1 >= 1, count of ranks):
    exact up to HEAD_EXACT, then about 300 log-spaced bins."""
    exact = np.arange(1, min(v - 1, HEAD_EXACT) + 1, dtype=np.float64)
    if v - 1 <= HEAD_EXACT:
        return exact, np.ones_like(exact)
    edges = np.unique(np.geomspace(HEAD_EXACT + 0.5, v - 0.5, 300))
    return (np.concatenate([exact, np.sqrt(edges[:-1] * edges[1:])]),
            np.concatenate([np.ones_like(exact), np.diff(edges)]))


def tail_masses(a: float, q: float, v: float) -> tuple[np.ndarray, np.ndarray]:
    """(probability of one rank in each bin, ranks in the bin) of the Zipf-Mandelbrot part,
    normalised to 1 (the continuous tail matches how the generator samples it)."""
    centre, count = rank_bins(v)
    w = (centre + q) ** -a
    return w / float(np.sum(w * count)), count


def column_masses(top: float, a: float, q: float, v: float) -> tuple[np.ndarray, np.ndarray]:
    """(probability of one value, values with it) over the whole column: the top value, then
    the Zipf-Mandelbrot ranks in bins."""
    p, count = tail_masses(a, q, v)
    return np.concatenate([[top], (1.0 - top) * p]), np.concatenate([[1.0], count])


def occupancy(p: np.ndarray, count: np.ndarray, n: float) -> tuple[float, float]:
    """Expected (distinct values, singleton values) after n draws from masses ``p``."""
    log_keep = np.log1p(-np.minimum(p, 1 - 1e-15))
    log_miss = n * log_keep
    distinct = np.sum(count * -np.expm1(log_miss))
    singles = np.sum(count * n * p * np.exp(log_miss - log_keep))
    return float(distinct), float(singles)


def expected_counts(top: float, a: float, q: float, v: float, n: float) -> tuple[float, float]:
    """Expected (distinct values, singleton values) of a column after n present rows."""
    return occupancy(*column_masses(top, a, q, v), n)


def nelder_mead(f, x0: np.ndarray, step: float = 0.5, iters: int = 600) -> np.ndarray:
    """Minimise f over R^k from x0 (plain Nelder-Mead; deterministic)."""
    pts = [np.asarray(x0, dtype=np.float64)]
    for i in range(len(x0)):
        x = pts[0].copy()
        x[i] += step
        pts.append(x)
    vals = [f(x) for x in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        centre = np.mean(pts[:-1], axis=0)
        xr = centre + (centre - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centre + 2 * (centre - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centre + 0.5 * (pts[-1] - centre)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0] + 0.5 * (x - pts[0]) for x in pts]
                vals = [f(x) for x in pts]
    return pts[int(np.argmin(vals))]


def fit_column(top: float, n_real: int, distinct_real: int, singles_real: int,
               n_full: float, distinct_full: int) -> dict:
    """Fit (a, q, V) of one categorical column; see the module doc."""
    targets = np.array([distinct_real, distinct_full, singles_real + 1.0])
    floor_v = max(distinct_full, distinct_real, 2)

    def unpack(x):
        return math.exp(x[0]), math.exp(x[1]) - 0.9, float(round(min(floor_v * (1.0 + math.exp(x[2])), MAX_VOCAB)))

    def loss(x):
        a, q, v = unpack(x)
        if not (0.05 < a < 20 and q < 1e7):
            return 1e9
        p, count = column_masses(top, a, q, v)
        d1, s1 = occupancy(p, count, n_real)
        d_full, _ = occupancy(p, count, n_full)
        rank1_excess = max(0.0, math.log(p[1] / top)) if len(p) > 1 else 0.0  # rank 1 must stay below the top
        return float(np.sum(np.log(np.array([d1, d_full, s1 + 1.0]) / targets) ** 2) + 10 * rank1_excess ** 2)

    starts = [(0.8, 1.0), (1.2, 1.0), (2.0, 1.0), (5.0, 0.0), (10.0, 0.0)]
    best = min((nelder_mead(loss, np.array([math.log(a0), math.log(q0 + 0.9), -2.0])) for a0, q0 in starts), key=loss)
    a, q, v = unpack(best)
    d1, s1 = expected_counts(top, a, q, v, n_real)
    d_full, _ = expected_counts(top, a, q, v, n_full)
    return {"a": round(a, 5), "q": round(q, 5), "vocab": int(round(v)),
            "fit": {"distinct_real": round(d1, 1), "singles_real": round(s1, 1), "distinct_full": round(d_full, 1)}}


def heaps_beta(n1: float, d1: float, n2: float, d2: float) -> float:
    """Two-point Heaps exponent: distinct(n) = K n^beta through (n1, d1) and (n2, d2)."""
    return math.log(d2 / d1) / math.log(n2 / n1)


def build_table(rows_file: str | Path = REAL_ROWS_FILE) -> dict:
    """The calibration table: measured targets and fitted generator parameters."""
    cols = read_columns(rows_file)
    stats = file_stats(cols)
    dense = {}
    for j, name in enumerate(DENSE_NAMES):
        s = stats["dense"][name]
        x = cols.dense[:, j]
        nonneg = x[~np.isnan(x) & (x >= 0)]
        p50, p90 = (float(np.quantile(nonneg, p, method="lower")) for p in (0.5, 0.9))
        mu = math.log1p(p50)
        sigma = max(0.05, (math.log1p(p90) - mu) / 1.2816)  # 1.2816: the standard normal's 90 % quantile
        dense[name] = {**s, "log1p_mu": round(mu, 5), "log1p_sigma": round(sigma, 5)}
    sparse = {}
    for t, name in enumerate(SPARSE_NAMES):
        s = stats["sparse"][name]
        full_present = KAGGLE_CARDINALITIES[t] - (1 if s["missing"] > 0 else 0)
        n_full = KAGGLE_ROWS * (1.0 - s["missing"])
        singles = round(s["singleton_share"] * s["present_rows"])
        fit = fit_column(s["top_share"], s["present_rows"], s["distinct"], singles, n_full, full_present)
        sparse[name] = {**s, "full_cardinality": KAGGLE_CARDINALITIES[t],
                        "heaps_beta": round(heaps_beta(s["present_rows"], s["distinct"], n_full, full_present), 4),
                        **fit}
    return {
        "source": {"rows_file": Path(rows_file).name, "rows": stats["rows"], "ctr_of_rows": round(stats["ctr"], 4),
                   "full_rows": KAGGLE_ROWS, "full_ctr": KAGGLE_CTR},
        "ctr": KAGGLE_CTR,
        "missing_groups": stats["missing_groups"],
        "dense": dense,
        "sparse": sparse,
    }


def render_table(table: dict) -> str:
    """Python source of ``criteo_like_table.py``."""
    return ('"""Calibration table of the criteo-like generator. GENERATED by\n'
            '``python -m data_prep.criteo_calibration``; do not edit by hand (see that module)."""\n\n'
            f"TABLE = {pprint.pformat(table, width=110, sort_dicts=False)}\n")


def main(argv: list[str]) -> None:
    rows_file = argv[0] if argv else REAL_ROWS_FILE
    write_atomic_text(TABLE_FILE, render_table(build_table(rows_file)))
    print(f"wrote {TABLE_FILE}")


if __name__ == "__main__":
    main(sys.argv[1:])
