"""Judging a parsed gate (:mod:`robkd.auditing.gates`) against an audit's metrics.

Judging (``on="lower"``, the default) asks that the gate hold with 95% confidence:

* A gate over ONE metric (``student.clean >= 0.85``, ``transfer.lost@0.1 <= 0.05``)
  uses the metric's exact 95% Clopper-Pearson interval with interval arithmetic:
  ``A >= B`` / ``A > B`` passes only when the lower end of ``A`` beats the upper
  end of ``B`` (``A <= B`` / ``A < B``: upper end of ``A`` against the lower end
  of ``B``), so it holds for every value inside the interval.
* A gate over SEVERAL metrics, or over ``transfer.ratio`` (a ratio of two counts
  on the same samples), is judged by a paired bootstrap when per-sample outcomes
  are available (they always are in an audit): teacher and student were measured
  on the same samples, so their errors are correlated and independent intervals
  would be far too wide (a student identical to its teacher would fail
  ``student.worst@r >= 0.9*teacher.worst@r``). The samples are resampled with
  replacement (``resamples`` times, seeded), every metric is recomputed on each
  resample, and the gate passes when it holds on at least 95% of them.
  Without per-sample outcomes (judging a results dict alone) the conservative
  interval arithmetic above is used.

``on="point"`` compares point estimates.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from robkd.auditing.gates import Gate, GateError, GateResult, Interval, Neg, Num, Ref, parse_gate

GATE_MODES = ("lower", "point")


class _Undefined(Exception):
    pass


def _eval(node: Any, lookup: Callable[[Ref], Interval | None], point: bool) -> Interval:
    if isinstance(node, Num):
        return Interval(node.value, node.value, node.value)
    if isinstance(node, Ref):
        iv = lookup(node)
        if iv is None:
            raise _Undefined(f"{node.text} is undefined in this audit")
        return Interval(iv.point, iv.point, iv.point) if point else iv
    if isinstance(node, Neg):
        v = _eval(node.operand, lookup, point)
        return Interval(-v.point, -v.hi, -v.lo)
    a = _eval(node.left, lookup, point)
    b = _eval(node.right, lookup, point)
    if node.op == "+":
        return Interval(a.point + b.point, a.lo + b.lo, a.hi + b.hi)
    if node.op == "-":
        return Interval(a.point - b.point, a.lo - b.hi, a.hi - b.lo)
    if node.op == "*":
        prods = [x * y for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
        if any(math.isnan(p) for p in prods):
            raise _Undefined("product of an unbounded interval and zero")
        return Interval(a.point * b.point, min(prods), max(prods))
    # division
    if b.lo <= 0.0 <= b.hi:
        raise _Undefined("division by a quantity whose interval contains 0")
    quots = [x / y for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    if any(math.isnan(q) for q in quots):
        raise _Undefined("division of unbounded quantities")
    return Interval(a.point / b.point, min(quots), max(quots))


#: per-sample outcomes of a metric for the paired judgement: ``(numerator, denominator)`` arrays of shape
#: (n,); the metric on a resample with sample weights ``w`` is ``w@num / w@den`` (``den`` None: ``w@num / n``)
SampleFn = Callable[[Ref], "tuple[Any, Any] | None"]
PAIRED_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000


def needs_pairing(gate: Gate) -> bool:
    """Whether the lower-bound judgement of ``gate`` needs the paired bootstrap (several metrics, or a ratio)."""
    refs = gate.refs()
    return len(refs) > 1 or any(r.subject == "transfer" and r.metric == "ratio" for r in refs)


def judge(gate: Gate | str, lookup: Callable[[Ref], Interval | None], *, on: str = "lower",
          samples: SampleFn | None = None, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> GateResult:
    """Judge one gate; ``lookup(ref)`` returns the metric's :class:`Interval` or None (undefined).

    ``on="lower"``: 95% confidence judgement (see module docstring); ``samples(ref)`` gives the
    per-sample outcomes the paired bootstrap of multi-metric gates needs (``resamples`` resamples,
    generator seeded with ``seed``). ``on="point"``: point estimates.
    """
    if on not in GATE_MODES:
        raise GateError(f"unknown gate mode {on!r}: use 'lower' (confidence bounds) or 'point'")
    if not isinstance(resamples, int) or isinstance(resamples, bool) or resamples < 100:
        raise GateError(f"resamples must be an integer >= 100, got {resamples!r}")
    g = parse_gate(gate) if isinstance(gate, str) else gate
    refs = {r.key: lookup(r) for r in g.refs()}
    point = on == "point"
    if not point and samples is not None and needs_pairing(g):
        return _judge_paired(g, refs, lookup, samples, resamples, seed)
    try:
        lhs = _eval(g.lhs, lookup, point)
        rhs = _eval(g.rhs, lookup, point)
    except _Undefined as exc:
        return GateResult(g.text, False, on, f"fail: {exc}", references=refs)
    except ZeroDivisionError:
        return GateResult(g.text, False, on, "fail: division by zero", references=refs)
    if g.cmp in (">=", ">"):
        left, right = lhs.lo, rhs.hi
        lname, rname = ("lower", "upper")
    else:
        left, right = lhs.hi, rhs.lo
        lname, rname = ("upper", "lower")
    ok = {">=": left >= right, ">": left > right, "<=": left <= right, "<": left < right}[g.cmp]
    if point:
        why = f"left {_fmt(left)} {g.cmp} right {_fmt(right)} (point estimates)"
    else:
        why = f"left {_fmt(left)} ({lname} 95% bound) {g.cmp} right {_fmt(right)} ({rname} 95% bound)"
    reason = ("pass: " if ok else "fail: not ") + why
    return GateResult(g.text, bool(ok), on, reason, lhs, rhs, (left, right), refs, method="point" if point else "interval")


def _judge_paired(g: Gate, refs: dict[str, Interval | None], lookup: Callable[[Ref], Interval | None],
                  samples: SampleFn, resamples: int, seed: int) -> GateResult:
    """Paired bootstrap: the fraction of resamples of the audited samples on which the gate holds."""
    import numpy as np

    try:
        lhs_p = _eval(g.lhs, lookup, True)
        rhs_p = _eval(g.rhs, lookup, True)
    except _Undefined as exc:
        return GateResult(g.text, False, "lower", f"fail: {exc}", references=refs)
    except ZeroDivisionError:
        return GateResult(g.text, False, "lower", "fail: division by zero", references=refs)
    per: dict[str, tuple[Any, Any]] = {}
    n = None
    for r in g.refs():
        got = samples(r)
        if got is None:
            return GateResult(g.text, False, "lower", f"fail: {r.text} is undefined in this audit", references=refs)
        num = np.asarray(got[0], dtype=np.float64).reshape(-1)
        den = None if got[1] is None else np.asarray(got[1], dtype=np.float64).reshape(-1)
        if n is None:
            n = num.shape[0]
        if num.shape[0] != n or (den is not None and den.shape[0] != n) or n == 0:
            raise GateError(f"per-sample outcomes of {r.key} do not cover the same {n} samples")
        per[r.key] = (num, den)
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, 250):  # chunks keep the (chunk, n) index matrix small
        b = min(250, resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        vals = {}
        with np.errstate(divide="ignore", invalid="ignore"):
            for key, (num, den) in per.items():
                vals[key] = num[idx].sum(1) / (den[idx].sum(1) if den is not None else n)
            diffs.append(_eval_array(g.lhs, vals) - _eval_array(g.rhs, vals))
    d = np.concatenate(diffs)
    d = np.where(np.isnan(d), -np.inf if g.cmp in (">=", ">") else np.inf, d)  # undefined resamples count against
    holds = {">=": d >= 0, ">": d > 0, "<=": d <= 0, "<": d < 0}[g.cmp]
    frac = float(holds.mean())
    ok = frac >= PAIRED_CONFIDENCE
    lower = g.cmp in (">=", ">")  # the one-sided 95% bound of lhs - rhs (an order statistic: no inf arithmetic)
    q = float(np.quantile(d, 1 - PAIRED_CONFIDENCE if lower else PAIRED_CONFIDENCE, method="lower" if lower else "higher"))
    why = (f"holds on {frac:.1%} of {resamples} paired bootstrap resamples (needs {PAIRED_CONFIDENCE:.0%}); "
           f"point estimates: left {_fmt(lhs_p.point)} {g.cmp} right {_fmt(rhs_p.point)}")
    reason = ("pass: " if ok else "fail: ") + why
    return GateResult(g.text, ok, "lower", reason, lhs_p, rhs_p, (q, 0.0), refs, method="paired-bootstrap",
                      holds_fraction=frac)


def _eval_array(node: Any, vals: dict[str, Any]) -> Any:
    """The expression on arrays of per-resample metric values (numpy division semantics: inf/nan, no error)."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Ref):
        return vals[node.key]
    if isinstance(node, Neg):
        return -_eval_array(node.operand, vals)
    a, b = _eval_array(node.left, vals), _eval_array(node.right, vals)
    return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b}[node.op]()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else ("+inf" if v > 0 else "-inf")
