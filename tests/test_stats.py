"""Fairness and latency statistics on inputs whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from testbed import stats


def test_jain_even_and_one_hot():
    assert stats.jain([10, 10, 10]) == pytest.approx(1.0)
    assert stats.jain([30, 0, 0]) == pytest.approx(1 / 3)
    # (1+2+3)^2 / (3 * (1+4+9)) = 36/42
    assert stats.jain([1, 2, 3]) == pytest.approx(36 / 42)
    assert math.isnan(stats.jain([]))
    assert math.isnan(stats.jain([0, 0]))


def test_cov_max_min_and_deviation():
    assert stats.cov([10, 10]) == 0.0
    # mean 2, population sd sqrt(2/3)
    assert stats.cov([1, 2, 3]) == pytest.approx(math.sqrt(2 / 3) / 2)
    assert stats.max_min([2, 4, 8]) == 4.0
    assert stats.max_min([5, 0]) == math.inf
    assert stats.max_deviation([4, 6, 5]) == 1.0
    assert stats.max_deviation([334, 333, 333]) == pytest.approx(2 / 3)


def test_chi2_against_uniform_known_values():
    # counts 10, 20, 30: expected 20 each -> (100 + 0 + 100)/20 = 10, dof 2 -> p = exp(-5)
    chi2, p = stats.chi2_uniform([10, 20, 30])
    assert chi2 == pytest.approx(10.0)
    assert p == pytest.approx(math.exp(-5))
    chi2, p = stats.chi2_uniform([50, 50])
    assert chi2 == 0.0 and p == pytest.approx(1.0)
    assert all(math.isnan(x) for x in stats.chi2_uniform([7]))


def test_rotation_is_exact_and_multinomial_is_not():
    """IPVS rr from one client is a rotation: counts differ by at most one, χ² ~ 0.
    A uniform random choice (iptables statistic / nftables numgen) is multinomial:
    its χ² p-values are spread over [0, 1] and about 5 % fall below 0.05."""
    n, k = 3000, 3
    rr = np.bincount(np.arange(n + 1) % k, minlength=k)  # n+1 requests: one backend got one more
    f = stats.fairness(rr)
    assert f["max_dev"] <= 1 and f["chi2_p"] > 0.99 and f["jain"] > 0.9999
    rng = np.random.default_rng(7)
    ps = [stats.chi2_uniform(rng.multinomial(n, [1 / k] * k))[1] for _ in range(400)]
    below = np.mean(np.array(ps) < 0.05)
    assert 0.02 < below < 0.09  # ~5 %
    assert 0.4 < float(np.median(ps)) < 0.6


def test_percentiles_nearest_rank():
    v = np.arange(1, 1001, dtype=float)  # 1..1000
    p = stats.percentiles(v)
    assert p == {"p50": 500.0, "p90": 900.0, "p99": 990.0, "p999": 999.0}
    p = stats.percentiles([5.0, 1.0, 3.0, float("nan")])
    assert p["p50"] == 3.0 and p["p999"] == 5.0  # NaN (no connect time) ignored
    assert all(math.isnan(x) for x in stats.percentiles([]).values())


def test_binomial_band_and_modal_share():
    lo, hi = stats.binomial_band(10_000, 2)
    assert lo == pytest.approx(0.5 - 1.96 * 0.005) and hi == pytest.approx(0.5 + 1.96 * 0.005)
    assert stats.modal_share(["a", "a", "b", "a"]) == 0.75
    assert stats.modal_share(["x"] * 5) == 1.0
