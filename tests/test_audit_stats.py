"""Clopper-Pearson intervals against closed forms and an independent bisection on the binomial CDF."""

from __future__ import annotations

import math

import pytest

from robkd.auditing.stats import Proportion, clopper_pearson, ratio_interval
from robkd.errors import UsageError


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P[X <= k] for X ~ Binomial(n, p), summed exactly with math.comb."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def _bisect(f, lo: float = 0.0, hi: float = 1.0, iters: int = 80) -> float:
    """Root of an increasing f on [lo, hi]."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize("n", [1, 7, 64, 200])
def test_closed_forms_at_the_extremes(n):
    a = 0.05
    lo, hi = clopper_pearson(0, n)
    assert lo == 0.0
    assert hi == pytest.approx(1 - (a / 2) ** (1 / n), rel=1e-10)
    lo, hi = clopper_pearson(n, n)
    assert hi == 1.0
    assert lo == pytest.approx((a / 2) ** (1 / n), rel=1e-10)


@pytest.mark.parametrize("k,n", [(1, 10), (5, 10), (37, 50), (120, 200)])
def test_interior_values_match_binomial_tail_inversion(k, n):
    # lower: P[X >= k | p] = a/2  <=>  1 - cdf(k-1) = a/2 ; upper: P[X <= k | p] = a/2
    a = 0.05
    lo_ref = _bisect(lambda p: (1 - _binom_cdf(k - 1, n, p)) - a / 2)
    hi_ref = _bisect(lambda p: a / 2 - _binom_cdf(k, n, p))
    lo, hi = clopper_pearson(k, n)
    assert lo == pytest.approx(lo_ref, abs=1e-9)
    assert hi == pytest.approx(hi_ref, abs=1e-9)
    assert lo < k / n < hi


def test_known_textbook_value():
    # 5 of 10: the exact 95% interval is (0.1871, 0.8129) (symmetric around 1/2)
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.187086, abs=1e-6)
    assert hi == pytest.approx(1 - lo, abs=1e-12)


@pytest.mark.parametrize("k,n", [(-1, 5), (6, 5), (0, 0), (1, -3)])
def test_bad_counts_are_rejected(k, n):
    with pytest.raises(UsageError):
        clopper_pearson(k, n)


def test_proportion_dict_and_ratio():
    p = Proportion.of(30, 100)
    d = p.to_dict()
    assert d["value"] == 0.3 and d["k"] == 30 and d["n"] == 100
    assert d["ci_low"] < 0.3 < d["ci_high"]
    t = Proportion.of(60, 100)
    point, lo, hi = ratio_interval(p, t)
    assert point == pytest.approx(0.5)
    # Bonferroni: each side at 97.5% -> the box is wider than the 95% one
    plo, phi = clopper_pearson(30, 100, 0.975)
    tlo, thi = clopper_pearson(60, 100, 0.975)
    assert lo == pytest.approx(plo / thi) and hi == pytest.approx(phi / tlo)
    assert plo < p.lo and phi > p.hi
    # undefined ratio when the teacher has nothing robust
    point, lo, hi = ratio_interval(p, Proportion.of(0, 100))
    assert point is None and hi is None and lo is not None
