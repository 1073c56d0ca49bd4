"""The corruption gate metrics (``<role>.corruption@S``, ``<role>.corruption``) read from a results dict and its
per-sample tensors (``<role>.corruption_correct``: ``(C, S, N)`` bool, corruptions x severities x samples, in the
order of the record's ``corruptions`` and ``severities``).

A sample's score is its share of (corruption, severity) pairs classified correctly (at severity ``S`` for
``corruption@S``); the metric is the mean score over the audited samples, so the paired bootstrap of a gate
comparing teacher and student resamples samples, both models' scores together.
"""

from __future__ import annotations

from typing import Any, Mapping

from robkd.auditing.gates import Interval, Ref


def corruption_record(data: Mapping[str, Any], role: str) -> dict[str, Any] | None:
    """The ``<role>.corruption`` record when the corruption evaluation ran (None otherwise)."""
    block = data.get(role)
    rec = block.get("corruption") if isinstance(block, dict) else None
    return rec if isinstance(rec, dict) and rec.get("status") == "ok" else None


def corruption_metric(data: Mapping[str, Any], ref: Ref) -> Interval | None:
    """The metric's value with its interval (None: not evaluated, or the severity was not)."""
    rec = corruption_record(data, ref.subject)
    if rec is None:
        return None
    est = rec.get("mean") if ref.radius is None else (rec.get("per_severity") or {}).get(str(int(ref.radius)))
    if not isinstance(est, dict) or est.get("value") is None:
        return None
    lo, hi = est.get("ci_low"), est.get("ci_high")
    return Interval(float(est["value"]), float("-inf") if lo is None else float(lo), float("inf") if hi is None else float(hi))


def corruption_samples(data: Mapping[str, Any], tensors: Mapping[str, Any], ref: Ref) -> tuple[Any, None] | None:
    """Per-sample scores of the metric (numpy ``(N,)``), for the paired judgement; None when undefined."""
    rec = corruption_record(data, ref.subject)
    t = tensors.get(f"{ref.subject}.corruption_correct")
    if rec is None or t is None:
        return None
    v = t.detach().cpu().double()
    if ref.radius is not None:
        sevs = [int(s) for s in rec.get("severities", [])]
        if int(ref.radius) not in sevs:
            return None
        v = v[:, sevs.index(int(ref.radius))]
        return v.mean(0).numpy(), None
    return v.mean((0, 1)).numpy(), None
