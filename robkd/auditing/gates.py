"""Release gates: a small, safe expression language over audit metrics (never ``eval``).

Grammar (one comparison per gate)::

    gate   := expr CMP expr
    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/") unary)*
    unary  := ("-" | "+") unary | atom
    atom   := NUMBER | REF | "(" expr ")"
    CMP    := ">=" | "<=" | ">" | "<"
    REF    := ("teacher" | "student") "." ("clean" | ("worst" | "certified" | ATTACK) "@" RADIUS
                                         | "corruption" ["@" SEVERITY])
            | "transfer" "." ("ratio" | "lost" | "gained") "@" RADIUS
    SEVERITY := 1 | 2 | 3 | 4 | 5 (``corruption@3``: mean accuracy over the corruptions at severity 3;
            ``corruption``: mean over every corruption and severity evaluated; needs --corruptions)
    RADIUS := a number or a fraction, e.g. 8/255, 0.1

How a gate is judged: :mod:`robkd.auditing.judging`. This module also holds the values a judgement
works on (:class:`Interval`) and its verdict (:class:`GateResult`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Sequence

from robkd.errors import UsageError
from robkd.types import format_radius, parse_radius

MAX_GATE_CHARS = 500
MAX_DEPTH = 40
MODEL_KEYWORDS = ("clean", "worst", "certified", "corruption")
TRANSFER_METRICS = ("ratio", "lost", "gained")

_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYWORD = re.compile(r"(?:clean|worst|certified|corruption|ratio|lost|gained)(?![A-Za-z0-9_])")
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
    if metric == "corruption":
        if radius is not None and (radius != int(radius) or not 1 <= radius <= 5):
            raise GateError(f"gate {text!r}: '{ident}.corruption@S' takes a corruption severity S in 1..5, "
                            f"got {text[start:i].split('@', 1)[1]}")
        return Ref(ident, metric, radius, text[start:i]), i
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


def parse_ref(text: str) -> Ref:
    """Parse one metric reference such as ``student.worst@8/255``; raises :class:`GateError` on junk."""
    if not isinstance(text, str):
        raise GateError(f"a metric reference must be a string, got {type(text).__name__}")
    text = text.strip()
    ref, end = _read_ref(text, 0, text.split(".", 1)[0])
    if end != len(text):
        raise GateError(f"bad metric reference {text!r}")
    return ref


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


def validate_gate(gate: Gate, *, radii: Sequence[float], attacks: Sequence[str], certified: bool,
                  severities: Sequence[int] | None = None) -> None:
    """Check, before any model runs, that every constant is a finite number (no ``1/0``, no ``9e9999``) and
    every reference names a measured metric at an audited radius (``severities``: the corruption severities
    evaluated, None when corruptions are not)."""
    for side in (gate.lhs, gate.rhs):
        _constant_value(side, gate.text)
    shown = ", ".join(format_radius(r) for r in radii)
    for ref in gate.refs():
        if ref.metric == "corruption":
            if severities is None:
                raise GateError(f"gate {gate.text!r}: {ref.text!r} needs the corruption evaluation (pass --corruptions)")
            if ref.radius is not None and int(ref.radius) not in severities:
                raise GateError(f"gate {gate.text!r}: severity {int(ref.radius)} in {ref.text!r} is not evaluated "
                                f"(severities: {', '.join(str(s) for s in severities)})")
            continue
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


# ----------------------------------------------------------------------------- values and verdicts
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
    short_by: float | None = None  # how far the point estimates miss the gate (None: they meet it)
    bound_short_by: float | None = None  # how far the 95% bounds miss it (None: passed, or judged on points)
    samples_needed: int | None = None  # about how many samples would decide a gate the bounds alone fail

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.text,
            "passed": self.passed,
            "on": self.on,
            "method": self.method,
            "holds_fraction": self.holds_fraction,
            "reason": self.reason,
            "short_by": None if self.short_by is None else _finite(self.short_by),
            "bound_short_by": None if self.bound_short_by is None else _finite(self.bound_short_by),
            "samples_needed": self.samples_needed,
            "lhs": self.lhs.to_dict() if self.lhs else None,
            "rhs": self.rhs.to_dict() if self.rhs else None,
            "compared": [_finite(v) for v in self.compared] if self.compared else None,
            "references": {k: (v.to_dict() if v else None) for k, v in self.references.items()},
        }
