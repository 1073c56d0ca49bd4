"""Exact binomial confidence bounds (Clopper-Pearson), the one implementation used by the audit's
intervals and by randomized smoothing's certificates."""

from __future__ import annotations

from robkd.errors import UsageError


def _check(k: int, n: int) -> tuple[int, int]:
    if isinstance(k, bool) or isinstance(n, bool):
        raise UsageError("k and n must be integers")
    k, n = int(k), int(n)
    if n <= 0:
        raise UsageError(f"a proportion needs n >= 1 trials, got n={n}")
    if not 0 <= k <= n:
        raise UsageError(f"successes k={k} must lie in [0, n={n}]")
    return k, n


def _lower(k: int, n: int, tail: float) -> float:
    """``Beta.ppf(tail; k, n-k+1)``, 0 when ``k == 0``."""
    from scipy.stats import beta

    return 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))


def _upper(k: int, n: int, tail: float) -> float:
    """``Beta.ppf(1 - tail; k+1, n-k)``, 1 when ``k == n``."""
    from scipy.stats import beta

    return 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Exact two-sided interval for ``k`` successes of ``n`` at ``confidence`` (each tail ``(1-confidence)/2``)."""
    k, n = _check(k, n)
    if not 0.0 < confidence < 1.0:
        raise UsageError(f"confidence must lie in (0, 1), got {confidence}")
    a = 1.0 - confidence
    return _lower(k, n, a / 2), _upper(k, n, a / 2)


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided ``(1 - alpha)`` lower bound: the lower end of the two-sided interval at confidence ``1 - 2 alpha``."""
    k, n = _check(k, n)
    if not 0.0 < alpha < 1.0:
        raise UsageError(f"alpha must lie in (0, 1), got {alpha}")
    return _lower(k, n, alpha)
