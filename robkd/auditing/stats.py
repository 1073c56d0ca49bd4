"""Proportions with exact (Clopper-Pearson) confidence intervals, and ratio intervals."""

from __future__ import annotations

import dataclasses
from typing import Any

from robkd.utils.stats import clopper_pearson as _clopper_pearson

#: Confidence level used throughout the audit (95%).
CONFIDENCE = 0.95


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact two-sided Clopper-Pearson interval (:func:`robkd.utils.stats.clopper_pearson`) at the audit's
    confidence by default."""
    return _clopper_pearson(k, n, confidence)


@dataclasses.dataclass(frozen=True)
class Proportion:
    """``k`` of ``n`` samples, the point estimate ``k/n`` and its Clopper-Pearson interval."""

    k: int
    n: int
    lo: float
    hi: float
    confidence: float = CONFIDENCE

    @classmethod
    def of(cls, k: int, n: int, confidence: float = CONFIDENCE) -> "Proportion":
        """Build from counts (computes the interval)."""
        lo, hi = clopper_pearson(k, n, confidence)
        return cls(int(k), int(n), lo, hi, confidence)

    @property
    def value(self) -> float:
        """The point estimate ``k / n``."""
        return self.k / self.n

    def to_dict(self) -> dict[str, Any]:
        """``{"value", "k", "n", "ci_low", "ci_high", "confidence"}``."""
        return {"value": self.value, "k": self.k, "n": self.n, "ci_low": self.lo, "ci_high": self.hi, "confidence": self.confidence}


def ratio_interval(num: Proportion, den: Proportion) -> tuple[float | None, float | None, float | None]:
    """Point value and a conservative interval for ``num.value / den.value``.

    Each proportion gets a Clopper-Pearson interval at confidence ``1 - a/2``
    (Bonferroni), so the box of both holds the true pair with probability
    >= ``1 - a``; the ratio interval is the image of that box:
    ``[num_lo / den_hi, num_hi / den_lo]`` (upper end ``None`` = unbounded when
    ``den_lo == 0``). The point value is ``None`` when ``den.k == 0``.
    """
    a = 1.0 - num.confidence
    nlo, nhi = clopper_pearson(num.k, num.n, 1.0 - a / 2)
    dlo, dhi = clopper_pearson(den.k, den.n, 1.0 - a / 2)
    point = None if den.k == 0 else num.value / den.value
    lo = nlo / dhi if dhi > 0 else None
    hi = nhi / dlo if dlo > 0 else None
    return point, lo, hi
