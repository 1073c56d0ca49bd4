"""Two audits side by side (``robkd compare A B``): clean and worst-case robust accuracy of each model, the
difference B - A with its 95% interval, and whether it is significant.

* **Paired** (both results audited the same samples, ``data.indices_sha256`` and the per-sample
  ``indices`` agree, and both ``samples.safetensors`` hold the outcomes): the exact McNemar test on the
  discordant samples, and Newcombe's hybrid score interval for a paired difference (method 10 of
  Newcombe 1998, with the phi correlation of the two outcomes).
* **Unpaired** otherwise: the two-sided two-proportion z-test (pooled), and Newcombe's hybrid score
  interval for independent proportions (method 10 of Newcombe 1998). On shared samples whose outcomes are
  not at hand this ignores the pairing, which usually makes it conservative.

A difference is significant when the test's p-value is below 0.05. Only radii audited by both (under
the same norm) are compared; the others are listed as audited by one only.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from robkd.auditing.stats import CONFIDENCE
from robkd.report.schema import Estimate, Results, find_radius
from robkd.types import format_radius

ROLES = ("teacher", "student")
ALPHA = 1.0 - CONFIDENCE


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n``."""
    from scipy.stats import norm

    z = float(norm.ppf(1 - (1 - confidence) / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(k_a: int, n_a: int, k_b: int, n_b: int, phi: float = 0.0) -> tuple[float, float]:
    """95% interval of ``k_b/n_b - k_a/n_a`` by Newcombe's hybrid score method (``phi``: the correlation of
    paired outcomes, 0 for independent samples)."""
    pa, pb = k_a / n_a, k_b / n_b
    la, ua = wilson(k_a, n_a)
    lb, ub = wilson(k_b, n_b)
    d = pb - pa
    lower = math.sqrt(max((pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2, 0.0))
    upper = math.sqrt(max((ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2, 0.0))
    return max(-1.0, d - lower), min(1.0, d + upper)


def two_proportion_p(k_a: int, n_a: int, k_b: int, n_b: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test (1 when both shares are 0 or both 1)."""
    from scipy.stats import norm

    pooled = (k_a + k_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 1.0
    z = (k_b / n_b - k_a / n_a) / se
    return float(min(1.0, 2 * norm.sf(abs(z))))


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided p-value of the exact McNemar test: ``only_a`` samples right for A only, ``only_b`` for B only."""
    from scipy.stats import binom

    m = only_a + only_b
    if m == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(only_a, only_b), m, 0.5)))


def paired_counts(a: Any, b: Any) -> tuple[int, int, int, int]:
    """``(both, only_a, only_b, neither)`` of two boolean per-sample vectors."""
    import numpy as np

    a, b = np.asarray(a, dtype=bool).reshape(-1), np.asarray(b, dtype=bool).reshape(-1)
    return int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum())


def _phi(both: int, only_a: int, only_b: int, neither: int) -> float:
    denom = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    return (both * neither - only_a * only_b) / math.sqrt(denom) if denom > 0 else 0.0


def compare_row(a: Estimate, b: Estimate, pair: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """One compared figure: both estimates, the difference ``b - a`` with its interval, the test and its p-value.
    ``pair``: the per-sample outcomes of A and B on the same samples (paired test), else unpaired."""
    out: dict[str, Any] = {"a": _estimate(a), "b": _estimate(b), "difference": None, "test": None, "p_value": None,
                           "significant": None}
    if a.value is None or b.value is None:
        return out
    out["difference"] = {"value": b.value - a.value, "ci_low": None, "ci_high": None}
    if pair is not None:
        both, only_a, only_b, neither = paired_counts(*pair)
        n = both + only_a + only_b + neither
        lo, hi = newcombe(both + only_a, n, both + only_b, n, _phi(both, only_a, only_b, neither))
        p = mcnemar_p(only_a, only_b)
        out.update(test="mcnemar-exact", only_a=only_a, only_b=only_b)
    elif a.k is not None and a.n and b.k is not None and b.n:
        lo, hi = newcombe(a.k, a.n, b.k, b.n)
        p = two_proportion_p(a.k, a.n, b.k, b.n)
        out["test"] = "two-proportion-z"
    else:  # counts not recorded: the difference alone
        return out
    out["difference"].update(ci_low=lo, ci_high=hi)
    out.update(p_value=p, significant=p < ALPHA)
    return out


def _estimate(e: Estimate) -> dict[str, Any]:
    return {"value": e.value, "ci_low": e.low, "ci_high": e.high, "k": e.k, "n": e.n}


def _vector(tensors: Mapping[str, Any] | None, key: str, i: int | None = None) -> Any:
    if not tensors or key not in tensors:
        return None
    t = tensors[key]
    t = t if i is None else (t[i] if t.dim() == 2 and i < t.shape[0] else None)
    return None if t is None else t.detach().cpu().numpy().astype(bool)


def same_samples(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether the two audits evaluated the same samples (same dataset, split and sample-index hash)."""
    da, db = Results(a).section("data"), Results(b).section("data")
    h = da.get("indices_sha256")
    return bool(h) and h == db.get("indices_sha256") and da.get("dataset") == db.get("dataset") and da.get("split") == db.get("split")


def _pairable(a_t: Mapping[str, Any] | None, b_t: Mapping[str, Any] | None) -> bool:
    import numpy as np

    if a_t is None or b_t is None or "indices" not in a_t or "indices" not in b_t:
        return False
    ia, ib = a_t["indices"].detach().cpu().numpy(), b_t["indices"].detach().cpu().numpy()
    return ia.shape == ib.shape and bool(np.array_equal(ia, ib))


def compare(a: dict[str, Any], b: dict[str, Any], tensors_a: Mapping[str, Any] | None = None,
            tensors_b: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The comparison of results ``a`` and ``b`` (validated results dicts; tensors: their per-sample outcomes,
    optional) as a JSON-ready dict: ``rows`` (model, metric, radius, both figures, difference, test, p-value,
    significant), ``same_samples``, ``paired``, ``only_in_a`` / ``only_in_b`` (radii audited by one only), ``notes``."""
    ra, rb = Results(a), Results(b)
    same = same_samples(a, b)
    paired = same and _pairable(tensors_a, tensors_b)
    notes: list[str] = []
    if not same:
        notes.append("the audits evaluated different samples (or did not record which): unpaired two-proportion tests")
    elif not paired:
        notes.append("same samples, but the per-sample outcomes (samples.safetensors) of both are not at hand: "
                     "unpaired two-proportion tests, usually conservative")
    common: list[tuple[float, int, int]] = []
    only_a: list[str] = []
    if ra.norm != rb.norm:
        notes.append(f"different threat models ({ra.norm} vs {rb.norm}): only clean accuracy is compared")
    else:
        for i, r in enumerate(ra.radii):
            j = find_radius(rb.radii, r)
            if j is None:
                only_a.append(format_radius(r))
            else:
                common.append((r, i, j))
    only_b = [format_radius(r) for r in rb.radii if ra.norm != rb.norm or find_radius(ra.radii, r) is None]
    rows = []
    for role in ROLES:
        ma, mb = ra.model(role), rb.model(role)
        pair = _pair(tensors_a, tensors_b, f"{role}.clean_correct", None, None) if paired else None
        rows.append({"model": role, "metric": "clean", "radius": None, "radius_text": None,
                     **compare_row(ma.clean, mb.clean, pair)})
        for r, i, j in common:
            pair = _pair(tensors_a, tensors_b, f"{role}.robust", i, j) if paired else None
            rows.append({"model": role, "metric": "worst", "radius": r, "radius_text": format_radius(r),
                         **compare_row(ma.row(i).worst, mb.row(j).worst, pair)})
    return {"same_samples": same, "paired": paired, "confidence": CONFIDENCE, "rows": rows,
            "only_in_a": only_a, "only_in_b": only_b, "notes": notes,
            "models": {side: {role: _model_name(res, role) for role in ROLES} for side, res in (("a", ra), ("b", rb))}}


def _pair(ta: Mapping[str, Any] | None, tb: Mapping[str, Any] | None, key: str, i: int | None, j: int | None) -> tuple[Any, Any] | None:
    va, vb = _vector(ta, key, i), _vector(tb, key, j)
    return (va, vb) if va is not None and vb is not None and va.shape == vb.shape else None


def _model_name(res: Results, role: str) -> str | None:
    info = res.model(role).info
    for key in ("name", "path", "source"):
        v = info.get(key)
        if isinstance(v, str) and v:
            return v
    v = res.section("config").get(role)
    return v if isinstance(v, str) and v else None
