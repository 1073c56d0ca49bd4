"""One ``certify.json`` result entry per radius, the same for every method (docs/certify-schema.md).

:func:`bound_entry` (IBP / CROWN / alpha-CROWN / budget, from a :class:`CertifyResult`),
:func:`milp_entry` (from :class:`~robkd.bounds.milp.MilpOutcome` s) and :func:`smoothing_entry` (from a
:class:`~robkd.bounds.smoothing.SmoothingResult` at one radius) all return the fields of
:func:`entry`: counts of the verdicts ``certified`` / ``falsified`` / ``unknown`` (``skipped`` only when
a caller passed a skip mask), exact fractions from those integer counts with Clopper-Pearson
intervals, and per-sample lists (verdict, margin lower bound, deciding method, ...). The validator is
:mod:`robkd.report.schema.certify`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from robkd.report.schema.certify import CONFIDENCE, SCHEMA, VERDICTS
from robkd.types import Norm, format_radius
from robkd.utils.stats import clopper_pearson

__all__ = ["CONFIDENCE", "SCHEMA", "VERDICTS", "bound_entry", "entry", "fraction", "milp_entry", "smoothing_entry"]


def fraction(k: int, n: int, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``{"k", "n", "value": k/n, "ci_low", "ci_high"}``: the value from the integer counts (never a float32
    mean), the exact two-sided Clopper-Pearson interval; value and interval None when ``n == 0``."""
    k, n = int(k), int(n)
    if n == 0:
        return {"k": k, "n": n, "value": None, "ci_low": None, "ci_high": None}
    lo, hi = clopper_pearson(k, n, confidence)
    return {"k": k, "n": n, "value": k / n, "ci_low": lo, "ci_high": hi}


def _num(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def entry(
    eps: float, norm: Norm, status: Sequence[str], *, margin_lb: Sequence[float | None], decided_by: Sequence[str],
    seconds: float, clean_correct: Sequence[bool] | None = None, extra_lists: dict[str, list] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The result entry of one radius from per-sample verdicts (``VERDICTS``) and margins."""
    n = len(status)
    counts = {v: sum(s == v for s in status) for v in VERDICTS}
    out: dict[str, Any] = {
        "eps": float(eps),
        "eps_str": format_radius(float(eps)),
        "norm": norm.value,
        "n": n,
        **counts,
        "certified_accuracy": counts["certified"] / n if n else None,
        "certified_fraction": fraction(counts["certified"], n),
        "clean_accuracy": None,
        "clean_fraction": None,
        "seconds": float(seconds),
    }
    if clean_correct is not None:
        k = sum(bool(c) for c in clean_correct)
        out["clean_accuracy"] = k / n if n else None
        out["clean_fraction"] = fraction(k, n)
    per = {
        "status": list(status),
        "certified": [s == "certified" for s in status],
        "margin_lb": [None if v is None else _num(v) for v in margin_lb],
        "decided_by": list(decided_by),
        "clean_correct": None if clean_correct is None else [bool(c) for c in clean_correct],
    }
    per.update(extra_lists or {})
    out["per_sample"] = per
    out.update(extra or {})
    return out


def bound_entry(res: Any) -> dict[str, Any]:
    """The entry of a :class:`~robkd.bounds.certification.CertifyResult` (IBP, CROWN, alpha-CROWN, budget)."""
    worst = res.margin_lb.min(dim=1).values.tolist() if res.margin_lb.shape[1] else [math.inf] * res.n
    lists: dict[str, list] = {
        "margin_exact": [bool(v) for v in res.exact.tolist()],
        "unstable_relus": [int(v) for v in res.unstable.tolist()],
        "linear_region": [bool(v) for v in res.linear_region.tolist()],
    }
    if res.fallbacks:
        lists["fallbacks"] = list(res.fallbacks)
    if res.sample_seconds:
        lists["seconds"] = [float(v) for v in res.sample_seconds]
    n = res.n
    extra = {
        "method": res.method,
        "backend": res.backend,
        "linear_region_fraction": sum(bool(v) for v in res.linear_region.tolist()) / n if n else None,
        "mean_unstable_relus": float(sum(int(v) for v in res.unstable.tolist())) / n if n else None,
        "total_relus": int(res.total_relus),
        "decided_counts": _tally(res.decided_by),
    }
    return entry(res.eps, res.norm, res.status, margin_lb=worst, decided_by=res.decided_by, seconds=res.seconds,
                 clean_correct=res.clean_correct.tolist(), extra_lists=lists, extra=extra)


def milp_entry(outs: Sequence[Any], eps: float, norm: Norm, seconds: float) -> dict[str, Any]:
    """The entry of :func:`~robkd.bounds.milp.verify_milp`'s outcomes (``verified`` is reported as ``certified``)."""
    status = [{"verified": "certified"}.get(o.status, o.status) for o in outs]
    margins = [min(o.margin_lower_bounds(), default=math.inf) for o in outs]
    decided = ["milp"] * len(status)
    lists = {
        "margin_exact": [o.min_margin is not None for o in outs],
        "unstable_relus": [int(o.unstable) for o in outs],
        "seconds": [float(o.seconds) for o in outs],
    }
    extra = {"method": "milp", "decided_counts": _tally(decided), "milp": [o.to_dict() for o in outs]}
    clean = [o.reason not in ("misclassified at the centre", "non-finite output at the centre") for o in outs]
    return entry(eps, norm, status, margin_lb=margins, decided_by=decided, seconds=seconds, clean_correct=clean,
                 extra_lists=lists, extra=extra)


def smoothing_entry(sres: Any, eps: float, seconds: float) -> dict[str, Any]:
    """The entry of randomized smoothing at L2 radius ``eps``: certified when the smoothed prediction is correct
    with certified radius >= ``eps``, falsified when it is wrong (abstentions and smaller radii: unknown)."""
    status = []
    for pred, ok, r in zip(sres.prediction.tolist(), sres.correct.tolist(), sres.radius.tolist()):
        if ok and r >= eps:
            status.append("certified")
        elif pred >= 0 and not ok:
            status.append("falsified")
        else:
            status.append("unknown")
    lists = {"smoothing_radius": [_num(v) for v in sres.radius.tolist()]}
    extra = {"method": "smoothing", "decided_counts": {"smoothing": len(status)}}
    return entry(eps, Norm.L2, status, margin_lb=[None] * len(status), decided_by=["smoothing"] * len(status),
                 seconds=seconds, clean_correct=[bool(v) for v in sres.correct.tolist()], extra_lists=lists,
                 extra=extra)


def _tally(names: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in names:
        out[s] = out.get(s, 0) + 1
    return dict(sorted(out.items()))
