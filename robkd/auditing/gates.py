"""Release gates: a small, safe expression language over audit metrics (never ``eval``).

Grammar (one comparison per gate)::

    gate   := expr CMP expr
    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/") unary)*
    unary  := ("-" | "+") unary | atom
    atom   := NUMBER | REF | "(" expr ")"
    CMP    := ">=" | "<=" | ">" | "<"
    REF    := ("teacher" | "student") "." ("clean" | ("worst" | "certified" | ATTACK) "@" RADIUS)
            | "transfer" "." ("ratio" | "lost" | "gained") "@" RADIUS
    RADIUS := a number or a fraction, e.g. 8/255, 0.1

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

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Sequence

from robkd.errors import UsageError
from robkd.types import format_radius, parse_radius

MAX_GATE_CHARS = 500
MAX_DEPTH = 40
MODEL_KEYWORDS = ("clean", "worst", "certified")
TRANSFER_METRICS = ("ratio", "lost", "gained")
COMPARATORS = (">=", "<=", ">", "<")
GATE_MODES = ("lower", "point")

_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYWORD = re.compile(r"(?:clean|worst|certified|ratio|lost|gained)(?![A-Za-z0-9_])")
_ATTACK = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*")
_RADIUS = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:/(?:\d+(?:\.\d*)?|\.\d+))?")


class GateError(UsageError):
    """A gate expression is malformed or names something the audit does not measure."""


# ----------------------------------------------------------------------------- AST
@dataclasses.dataclass(frozen=True)
class Num:
    """A numeric literal."""

    value: float


@dataclasses.dataclass(frozen=True)
class Ref:
    """A metric reference such as ``student.worst@8/255``."""

    subject: str  # teacher | student | transfer
    metric: str  # clean | worst | certified | <attack> | ratio | lost | gained
    radius: float | None
    text: str

    @property
    def key(self) -> str:
        """Canonical name, e.g. ``student.worst@8/255``."""
        r = "" if self.radius is None else "@" + format_radius(self.radius)
        return f"{self.subject}.{self.metric}{r}"


@dataclasses.dataclass(frozen=True)
class BinOp:
    """``left op right`` with ``op`` in ``+ - * /``."""

    op: str
    left: Any
    right: Any


@dataclasses.dataclass(frozen=True)
class Neg:
    """Unary minus."""

    operand: Any


@dataclasses.dataclass(frozen=True)
class Gate:
    """A parsed gate: ``lhs cmp rhs``."""

    text: str
    lhs: Any
    cmp: str
    rhs: Any

    def refs(self) -> list[Ref]:
        """Every metric reference, in order of appearance (duplicates removed)."""
        out: list[Ref] = []
        for node in (self.lhs, self.rhs):
            _collect_refs(node, out)
        seen: set[str] = set()
        uniq = []
        for r in out:
            if r.key not in seen:
                seen.add(r.key)
                uniq.append(r)
        return uniq


def _collect_refs(node: Any, out: list[Ref]) -> None:
    if isinstance(node, Ref):
        out.append(node)
    elif isinstance(node, BinOp):
        _collect_refs(node.left, out)
        _collect_refs(node.right, out)
    elif isinstance(node, Neg):
        _collect_refs(node.operand, out)


# ----------------------------------------------------------------------------- tokenizer
@dataclasses.dataclass(frozen=True)
class _Tok:
    kind: str  # num | ref | op | cmp | lpar | rpar | end
    value: Any
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c in "<>":
            if i + 1 < n and text[i + 1] == "=":
                toks.append(_Tok("cmp", c + "=", i))
                i += 2
            else:
                toks.append(_Tok("cmp", c, i))
                i += 1
            continue
        if c in "+-*/":
            toks.append(_Tok("op", c, i))
            i += 1
            continue
        if c == "(":
            toks.append(_Tok("lpar", c, i))
            i += 1
            continue
        if c == ")":
            toks.append(_Tok("rpar", c, i))
            i += 1
            continue
        m = _NUMBER.match(text, i)
        if m:
            toks.append(_Tok("num", float(m.group()), i))
            i = m.end()
            continue
        m = _IDENT.match(text, i)
        if m:
            ref, i = _read_ref(text, i, m.group())
            toks.append(_Tok("ref", ref, m.start()))
            continue
        raise GateError(f"gate {text!r}: unexpected character {c!r} at position {i}")
    toks.append(_Tok("end", None, n))
    return toks


def _read_ref(text: str, start: int, ident: str) -> tuple[Ref, int]:
    i = start + len(ident)
    if ident not in ("teacher", "student", "transfer") or i >= len(text) or text[i] != ".":
        raise GateError(
            f"gate {text!r}: unknown name {ident!r} at position {start}; references look like "
            "student.worst@8/255, teacher.clean, student.pgd-20@0.1 or transfer.ratio@8/255"
        )
    i += 1
    m = _KEYWORD.match(text, i)
    if m and (m.group() in MODEL_KEYWORDS) == (ident != "transfer"):
        metric, i = m.group(), m.end()
    else:
        m = _ATTACK.match(text, i)
        if not m:
            raise GateError(f"gate {text!r}: expected a metric name after '{ident}.' at position {i}")
        metric, i = m.group(), m.end()
        if ident == "transfer":
            raise GateError(f"gate {text!r}: unknown transfer metric {metric!r} (use one of {', '.join(TRANSFER_METRICS)})")
    radius: float | None = None
    if i < len(text) and text[i] == "@":
        m = _RADIUS.match(text, i + 1)
        if not m:
            raise GateError(f"gate {text!r}: expected a radius such as 8/255 or 0.1 after '@' at position {i}")
        radius = parse_radius(m.group())
        i = m.end()
    if metric == "clean" and radius is not None:
        raise GateError(f"gate {text!r}: '{ident}.clean' takes no radius (clean accuracy does not depend on one)")
    if metric != "clean" and radius is None:
        raise GateError(f"gate {text!r}: '{ident}.{metric}' needs a radius, e.g. '{ident}.{metric}@8/255'")
    return Ref(ident, metric, radius, text[start:i]), i


# ----------------------------------------------------------------------------- parser
class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, msg: str, tok: _Tok) -> GateError:
        return GateError(f"gate {self.text!r}: {msg} at position {tok.pos}")

    def gate(self) -> Gate:
        lhs = self.expr()
        tok = self.take()
        if tok.kind != "cmp":
            raise self.fail("expected a comparison (>=, <=, >, <)" if tok.kind == "end" else f"unexpected {tok.value!r}", tok)
        rhs = self.expr()
        end = self.take()
        if end.kind == "cmp":
            raise self.fail("only one comparison per gate (write two gates)", end)
        if end.kind != "end":
            raise self.fail(f"unexpected {end.value!r}", end)
        return Gate(self.text, lhs, tok.value, rhs)

    def expr(self) -> Any:
        node = self.term()
        while self.peek().kind == "op" and self.peek().value in "+-":
            op = self.take().value
            node = BinOp(op, node, self.term())
        return node

    def term(self) -> Any:
        node = self.unary()
        while self.peek().kind == "op" and self.peek().value in "*/":
            op = self.take().value
            node = BinOp(op, node, self.unary())
        return node

    def unary(self) -> Any:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail("expression nested too deeply", self.peek())
        try:
            tok = self.peek()
            if tok.kind == "op" and tok.value in "+-":
                self.take()
                inner = self.unary()
                return Neg(inner) if tok.value == "-" else inner
            return self.atom()
        finally:
            self.depth -= 1

    def atom(self) -> Any:
        tok = self.take()
        if tok.kind == "num":
            return Num(tok.value)
        if tok.kind == "ref":
            return tok.value
        if tok.kind == "lpar":
            node = self.expr()
            close = self.take()
            if close.kind != "rpar":
                raise self.fail("expected ')'", close)
            return node
        if tok.kind == "end":
            raise self.fail("expression ends too early", tok)
        raise self.fail(f"unexpected {tok.value!r}", tok)


def parse_gate(text: str) -> Gate:
    """Parse one gate expression; raises :class:`GateError` (a :class:`UsageError`) on junk."""
    if not isinstance(text, str):
        raise GateError(f"a gate must be a string, got {type(text).__name__}")
    if not text.strip():
        raise GateError("empty gate")
    if len(text) > MAX_GATE_CHARS:
        raise GateError(f"gate longer than {MAX_GATE_CHARS} characters")
    return _Parser(text.strip()).gate()


def _constant_value(node: Any, text: str) -> float | None:
    """The value of ``node`` when it holds no metric (None otherwise); a constant that is not a finite
    number (``9e9999``, ``1/0``, an overflow) is a :class:`GateError`. (:func:`judge` alone fails such a
    gate with a reason; :func:`validate_gate` refuses it before an audit starts.)"""
    if isinstance(node, Ref):
        return None
    if isinstance(node, Num):
        value = float(node.value)
    elif isinstance(node, Neg):
        inner = _constant_value(node.operand, text)
        value = None if inner is None else -inner
    elif isinstance(node, BinOp):
        left, right = _constant_value(node.left, text), _constant_value(node.right, text)
        if node.op == "/" and right == 0.0:
            raise GateError(f"gate {text!r} divides by zero")
        if left is None or right is None:
            return None
        try:
            value = {"+": left + right, "-": left - right, "*": left * right, "/": left / right if right else math.nan}[node.op]
        except OverflowError:
            value = math.inf
    else:  # pragma: no cover - the parser builds only the nodes above
        return None
    if value is not None and not math.isfinite(value):
        raise GateError(f"gate {text!r} holds a constant that is not a finite number")
    return value


def validate_gate(gate: Gate, *, radii: Sequence[float], attacks: Sequence[str], certified: bool) -> None:
    """Check, before any model runs, that every constant is a finite number (no ``1/0``, no ``9e9999``) and
    every reference names a measured metric at an audited radius."""
    for side in (gate.lhs, gate.rhs):
        _constant_value(side, gate.text)
    shown = ", ".join(format_radius(r) for r in radii)
    for ref in gate.refs():
        if ref.radius is not None and match_radius(ref.radius, radii) is None:
            raise GateError(
                f"gate {gate.text!r}: radius {format_radius(ref.radius)} in {ref.text!r} is not audited (audited radii: {shown})"
            )
        if ref.subject == "transfer":
            continue
        if ref.metric == "certified" and not certified:
            raise GateError(f"gate {gate.text!r}: {ref.text!r} needs certification (pass --certify ibp|crown|alpha-crown)")
        if ref.metric not in MODEL_KEYWORDS and ref.metric not in attacks:
            raise GateError(
                f"gate {gate.text!r}: {ref.metric!r} in {ref.text!r} is neither clean/worst/certified nor an audited attack "
                f"(audited attacks: {', '.join(attacks)})"
            )


def match_radius(radius: float, radii: Iterable[float]) -> float | None:
    """The audited radius equal to ``radius`` (up to float rounding), else None."""
    for r in radii:
        if abs(r - radius) <= 1e-9 * max(1.0, abs(r)):
            return r
    return None


# ----------------------------------------------------------------------------- judging
@dataclasses.dataclass(frozen=True)
class Interval:
    """A value with a point estimate and an interval ``[lo, hi]`` (may be infinite)."""

    point: float
    lo: float
    hi: float

    def to_dict(self) -> dict[str, float | None]:
        return {"point": _finite(self.point), "low": _finite(self.lo), "high": _finite(self.hi)}


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


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


@dataclasses.dataclass
class GateResult:
    """The verdict on one gate, with the values used and the reason."""

    text: str
    passed: bool
    on: str
    reason: str
    lhs: Interval | None = None
    rhs: Interval | None = None
    compared: tuple[float, float] | None = None
    references: dict[str, Interval | None] = dataclasses.field(default_factory=dict)
    method: str = "interval"  # interval | paired-bootstrap | point
    holds_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.text,
            "passed": self.passed,
            "on": self.on,
            "method": self.method,
            "holds_fraction": self.holds_fraction,
            "reason": self.reason,
            "lhs": self.lhs.to_dict() if self.lhs else None,
            "rhs": self.rhs.to_dict() if self.rhs else None,
            "compared": [_finite(v) for v in self.compared] if self.compared else None,
            "references": {k: (v.to_dict() if v else None) for k, v in self.references.items()},
        }


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
