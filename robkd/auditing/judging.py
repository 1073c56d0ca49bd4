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
_HOLDS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


def needs_pairing(gate: Gate) -> bool:
    """Whether the lower-bound judgement of ``gate`` needs the paired bootstrap (several metrics, or a ratio)."""
    refs = gate.refs()
    return len(refs) > 1 or any(r.subject == "transfer" and r.metric == "ratio" for r in refs)


def judge(gate: Gate | str, lookup: Callable[[Ref], Interval | None], *, on: str = "lower",
          samples: SampleFn | None = None, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
          sample_size: int | None = None) -> GateResult:
    """Judge one gate; ``lookup(ref)`` returns the metric's :class:`Interval` or None (undefined).

    ``on="lower"``: 95% confidence judgement (see module docstring); ``samples(ref)`` gives the
    per-sample outcomes the paired bootstrap of multi-metric gates needs (``resamples`` resamples,
    generator seeded with ``seed``). ``on="point"``: point estimates. ``sample_size``: the number of
    audited samples (else read off ``samples``), used to say how many samples would decide a gate whose
    point estimates hold but whose confidence bounds do not (``samples_needed``).
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
        return GateResult(g.text, False, on, f"FAIL: {exc}", references=refs)
    except ZeroDivisionError:
        return GateResult(g.text, False, on, "FAIL: division by zero", references=refs)
    ge = g.cmp in (">=", ">")
    left, right = (lhs.lo, rhs.hi) if ge else (lhs.hi, rhs.lo)
    ok = bool(_HOLDS[g.cmp](left, right))
    points_hold = bool(_HOLDS[g.cmp](lhs.point, rhs.point))
    short = None if points_hold else _shortfall(g.cmp, lhs.point, rhs.point)
    bound_short = None if ok or point else _shortfall(g.cmp, left, right)
    needed = None
    if not ok and not point and points_hold:
        n = sample_size if sample_size is not None else _size_of(g, samples)
        needed = _samples_needed_interval(g, lookup, n) if n else None
    if point:
        why = f"{_side(g.lhs, lhs)} {_shown_cmp(g.cmp, ok)} {_side(g.rhs, rhs)} (point estimates)"
    elif ok or not points_hold:
        lb, rb = ("lower", "upper") if ge else ("upper", "lower")
        why = f"{_side(g.lhs, lhs, lb, left)} {_shown_cmp(g.cmp, ok)} {_side(g.rhs, rhs, rb, right)}"
    else:
        why = (f"{_side(g.lhs, lhs)} {g.cmp} {_side(g.rhs, rhs)} on the point estimates, but not at 95% confidence: "
               f"{_bound_text(g.lhs, 'lower' if ge else 'upper', left)} {_shown_cmp(g.cmp, False)} "
               f"{_bound_text(g.rhs, 'upper' if ge else 'lower', right)}")
    reason = _reason(ok, why, short, bound_short, needed)
    return GateResult(g.text, ok, on, reason, lhs, rhs, (left, right), refs, method="point" if point else "interval",
                      short_by=short, bound_short_by=bound_short, samples_needed=needed)


def _judge_paired(g: Gate, refs: dict[str, Interval | None], lookup: Callable[[Ref], Interval | None],
                  samples: SampleFn, resamples: int, seed: int) -> GateResult:
    """Paired bootstrap: the fraction of resamples of the audited samples on which the gate holds."""
    import numpy as np

    try:
        lhs_p = _eval(g.lhs, lookup, True)
        rhs_p = _eval(g.rhs, lookup, True)
    except _Undefined as exc:
        return GateResult(g.text, False, "lower", f"FAIL: {exc}", references=refs)
    except ZeroDivisionError:
        return GateResult(g.text, False, "lower", "FAIL: division by zero", references=refs)
    per: dict[str, tuple[Any, Any]] = {}
    n = None
    for r in g.refs():
        got = samples(r)
        if got is None:
            return GateResult(g.text, False, "lower", f"FAIL: {r.text} is undefined in this audit", references=refs)
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
    points_hold = bool(_HOLDS[g.cmp](lhs_p.point, rhs_p.point))
    short = None if points_hold else _shortfall(g.cmp, lhs_p.point, rhs_p.point)
    bound_short = None if ok else _shortfall(g.cmp, q, 0.0)
    needed = None
    held = f"holds on {frac:.1%} of {resamples} paired bootstrap resamples (needs {PAIRED_CONFIDENCE:.0%})"
    if ok or not points_hold:
        why = f"{_side(g.lhs, lhs_p)} {_shown_cmp(g.cmp, ok)} {_side(g.rhs, rhs_p)} (point estimates); {held}"
    else:
        margin = (lhs_p.point - rhs_p.point) if lower else (rhs_p.point - lhs_p.point)
        spread = (margin - q) if lower else (margin + q)  # distance from the point margin to the 95% bound
        if margin > 0 and math.isfinite(spread) and spread > 0:  # normal approximation: the spread shrinks as 1/sqrt(n)
            needed = max(int(math.ceil(n * (spread / margin) ** 2)), n + 1)
        why = (f"{_side(g.lhs, lhs_p)} {g.cmp} {_side(g.rhs, rhs_p)} on the point estimates, but it {held.replace('holds', 'holds only', 1)}")
    reason = _reason(ok, why, short, bound_short, needed)
    return GateResult(g.text, ok, "lower", reason, lhs_p, rhs_p, (q, 0.0), refs, method="paired-bootstrap",
                      holds_fraction=frac, short_by=short, bound_short_by=bound_short, samples_needed=needed)


# ----------------------------------------------------------------------------- how many samples would decide it
MAX_SAMPLES = 10**8


def _size_of(g: Gate, samples: SampleFn | None) -> int | None:
    """The number of audited samples, read off the per-sample outcomes of the gate's first metric."""
    if samples is None:
        return None
    for r in g.refs():
        got = samples(r)
        if got is not None:
            return int(len(got[0]))
    return None


def _cp(p: float, n: float, confidence: float) -> tuple[float, float]:
    """Clopper-Pearson interval of an observed share ``p`` of ``n`` samples (``k = p n``, not rounded, so the
    observed proportion stays exactly as measured while ``n`` grows)."""
    from scipy.stats import beta

    k, tail = p * n, (1.0 - confidence) / 2
    lo = 0.0 if k <= 0 else float(beta.ppf(tail, k, n - k + 1))
    hi = 1.0 if k >= n else float(beta.ppf(1 - tail, k + 1, n - k))
    return lo, hi


def _rescaled(lookup: Callable[[Ref], Interval | None], n: int) -> Callable[[Ref], Interval | None]:
    """``lookup`` with every metric's interval recomputed for ``n`` samples at its observed value, by the audit's
    interval method: Clopper-Pearson at 95%; ``transfer.ratio`` the Bonferroni box of the student's and the
    teacher's worst-case accuracies at 97.5%."""
    def at(ref: Ref) -> Interval | None:
        iv = lookup(ref)
        if iv is None or not math.isfinite(iv.point):
            return None
        if ref.subject == "transfer" and ref.metric == "ratio":
            s = lookup(Ref("student", "worst", ref.radius, ref.text))
            t = lookup(Ref("teacher", "worst", ref.radius, ref.text))
            if s is None or t is None:
                return None
            (slo, shi), (tlo, thi) = _cp(s.point, n, 0.975), _cp(t.point, n, 0.975)
            return Interval(iv.point, slo / thi if thi > 0 else -math.inf, shi / tlo if tlo > 0 else math.inf)
        lo, hi = _cp(min(max(iv.point, 0.0), 1.0), n, 0.95)
        return Interval(iv.point, lo, hi)

    return at


def _samples_needed_interval(g: Gate, lookup: Callable[[Ref], Interval | None], n: int) -> int | None:
    """About the smallest number of samples at which the gate would pass on its 95% bounds, the observed
    proportions staying as they are (None: none up to :data:`MAX_SAMPLES`)."""
    ge = g.cmp in (">=", ">")

    def passes(m: int) -> bool:
        look = _rescaled(lookup, m)
        try:
            lhs, rhs = _eval(g.lhs, look, False), _eval(g.rhs, look, False)
        except (_Undefined, ZeroDivisionError):
            return False
        return bool(_HOLDS[g.cmp](lhs.lo, rhs.hi) if ge else _HOLDS[g.cmp](lhs.hi, rhs.lo))

    lo, hi = n, 2 * n
    while not passes(hi):
        lo, hi = hi, 2 * hi
        if hi > MAX_SAMPLES:
            return None
    while hi - lo > max(1, lo // 100):  # to about 1%
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return hi


# ----------------------------------------------------------------------------- wording
_NEGATED = {">=": "<", ">": "<=", "<=": ">", "<": ">="}


def _shown_cmp(cmp: str, ok: bool) -> str:
    """The comparison that holds between the compared numbers: the gate's own when it passed, else its negation."""
    return cmp if ok else _NEGATED[cmp]


def _shortfall(cmp: str, left: float, right: float) -> float:
    """How far ``left`` misses ``left cmp right`` (0 for a strict comparison missed by equality)."""
    return max(right - left if cmp in (">=", ">") else left - right, 0.0)


def _reason(ok: bool, why: str, short: float | None, bound_short: float | None, needed: int | None) -> str:
    if ok:
        return "PASS: " + why
    if short is not None:
        return f"FAIL: {why}; short by {_fmt(short)}"
    tail = f" (short by {_fmt(bound_short)} at the 95% bound)" if bound_short is not None else ""
    if needed is not None:
        tail += f"; about {needed} samples would decide it"
    return "FAIL: " + why + tail


def _side(node: Any, value: Interval, bound: str | None = None, at: float | None = None) -> str:
    """One side of a gate as written, with its value and (for a side holding a metric) the bound compared."""
    if isinstance(node, Num):
        return _fmt(node.value)
    text = f"{unparse(node)} = {_fmt(value.point)}"
    if bound is not None and at is not None and not _constant(node):
        text += f" ({bound} 95% bound {_fmt(at)})"
    return text


def _bound_text(node: Any, bound: str, at: float) -> str:
    """``lower 95% bound 0.62`` for a side holding a metric, the bare value for a constant."""
    return _fmt(at) if _constant(node) else f"{bound} 95% bound {_fmt(at)}"


def _constant(node: Any) -> bool:
    if isinstance(node, Ref):
        return False
    if isinstance(node, Neg):
        return _constant(node.operand)
    if isinstance(node, Num):
        return True
    return _constant(node.left) and _constant(node.right)


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def unparse(node: Any, parent: int = 0, right_of: str | None = None) -> str:
    """A gate expression as text: references as the user wrote them (radius included), ``x`` for ``*``."""
    if isinstance(node, Num):
        return f"{node.value:g}"
    if isinstance(node, Ref):
        return node.text
    if isinstance(node, Neg):
        return "-" + unparse(node.operand, 3)
    prec = _PRECEDENCE[node.op]
    sym = " x " if node.op == "*" else f" {node.op} "
    text = unparse(node.left, prec) + sym + unparse(node.right, prec, node.op)
    wrap = prec < parent or (right_of in ("-", "/") and prec == parent)
    return f"({text})" if wrap else text


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
    return f"{v:.3g}" if math.isfinite(v) else ("+inf" if v > 0 else "-inf")
