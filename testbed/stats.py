"""Statistics over the raw per-request rows: latency percentiles and fairness.

Pure functions over numbers (numpy / scipy); every summary the reports show is one of
these applied to a group of raw rows, so ``testbed report`` recomputes them exactly.

Latency percentiles use the nearest-rank definition (rank ``ceil(p·n)``: the
smallest observed value with at least ``p`` % of the samples at or below it), as
latency tools such as HdrHistogram report them: every percentile is a latency that
really happened (p99.9 of 1000 samples is the 999th smallest).

Fairness is over the Service's *expected* backends (every ready endpoint, also those
that got nothing): with ``counts`` = requests per backend, ``k`` backends, ``n``
requests,

* Jain's index ``(Σx)² / (k·Σx²)``: 1 when even, ``1/k`` when one backend gets all;
* CoV ``σ/μ`` (population σ);
* max/min (``inf`` when a backend got nothing);
* max deviation ``max |x - n/k|`` in requests: IPVS ``rr`` from one source node stays
  within 1 (a deterministic rotation), kube-proxy's iptables ``statistic --mode random``
  and nftables ``numgen random`` choices are multinomial (deviation ~ ``sqrt(n/k)``);
* Pearson's χ² against the uniform distribution and its p-value (``scipy.stats.chisquare``,
  ``k-1`` degrees of freedom): for a multinomial source p is uniform on [0, 1]; for a
  rotation χ² is ~0 and p ~1 (more even than chance).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "PERCENTILES",
    "percentiles",
    "jain",
    "cov",
    "max_min",
    "max_deviation",
    "chi2_uniform",
    "fairness",
    "binomial_band",
    "modal_share",
]

#: The latency percentiles every summary reports (column suffix -> percentile).
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


def percentiles(values: Iterable[float], which: dict[str, float] = PERCENTILES) -> dict[str, float]:
    """Nearest-rank percentiles; NaN for no samples."""
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return {k: math.nan for k in which}
    arr = np.sort(arr)
    n = arr.size
    # rank = ceil(p/100 * n), rounded first so 99.9 % of 1000 is rank 999, not 1000
    ranks = [min(n, max(1, math.ceil(round(q / 100.0 * n, 9)))) for q in which.values()]
    return {k: float(arr[r - 1]) for k, r in zip(which, ranks)}


def _counts(counts: Sequence[float]) -> np.ndarray:
    return np.asarray(counts, dtype=float)


def jain(counts: Sequence[float]) -> float:
    """Jain's fairness index; NaN with no backends or no requests."""
    x = _counts(counts)
    s2 = float((x * x).sum())
    if x.size == 0 or s2 == 0:
        return math.nan
    return float(x.sum()) ** 2 / (x.size * s2)


def cov(counts: Sequence[float]) -> float:
    """Coefficient of variation σ/μ (population σ); NaN with no requests."""
    x = _counts(counts)
    if x.size == 0 or x.mean() == 0:
        return math.nan
    return float(x.std(ddof=0) / x.mean())


def max_min(counts: Sequence[float]) -> float:
    """max/min of the per-backend counts (inf when one backend got nothing)."""
    x = _counts(counts)
    if x.size == 0 or x.max() == 0:
        return math.nan
    return math.inf if x.min() == 0 else float(x.max() / x.min())


def max_deviation(counts: Sequence[float]) -> float:
    """Largest distance of a backend's count from the even share n/k, in requests."""
    x = _counts(counts)
    if x.size == 0:
        return math.nan
    return float(np.abs(x - x.mean()).max())


def chi2_uniform(counts: Sequence[float]) -> tuple[float, float]:
    """Pearson's χ² against uniform and its p-value (k-1 dof); NaN for k < 2 or n = 0."""
    x = _counts(counts)
    if x.size < 2 or x.sum() == 0:
        return math.nan, math.nan
    from scipy import stats as sps

    r = sps.chisquare(x)
    return float(r.statistic), float(r.pvalue)


def fairness(counts: Sequence[float]) -> dict[str, float]:
    """All fairness metrics of one set of per-backend counts."""
    chi2, p = chi2_uniform(counts)
    return {
        "jain": jain(counts),
        "cov": cov(counts),
        "max_min": max_min(counts),
        "max_dev": max_deviation(counts),
        "chi2": chi2,
        "chi2_p": p,
    }


def binomial_band(n: int, k: int, z: float = 1.96) -> tuple[float, float]:
    """The range of one backend's share that a uniform multinomial choice over ``k``
    backends gives with ~95 % probability for ``n`` requests (normal approximation of
    Binomial(n, 1/k)); drawn on the share plots."""
    if n <= 0 or k <= 0:
        return math.nan, math.nan
    p = 1.0 / k
    half = z * math.sqrt(p * (1 - p) / n)
    return max(0.0, p - half), min(1.0, p + half)


def modal_share(labels: Sequence[str]) -> float:
    """Share of the most frequent value (session affinity: 1.0 = every request of a
    client went to one backend)."""
    if len(labels) == 0:
        return math.nan
    _, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    return float(counts.max() / counts.sum())
