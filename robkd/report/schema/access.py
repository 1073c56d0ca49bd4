"""Typed, read-only access to a results dict: :class:`Results` and the blocks it is made of.

The views read leniently: a missing or malformed optional part reads as absent (None, an empty list, an
empty :class:`Estimate`), so they serve validated files (:func:`~robkd.report.schema.load_results`) and
dicts that only passed :func:`~robkd.report.schema.check_schema` alike. Values are typed on the way out:
numbers are finite floats or None, figures are :class:`Estimate`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable


def find_radius(radii: Iterable[float], radius: float | None) -> int | None:
    """Position of the audited radius equal to ``radius`` up to float rounding, else None."""
    if radius is None:
        return None
    for i, r in enumerate(radii):
        if abs(r - radius) <= 1e-9 * max(1.0, abs(r)):
            return i
    return None


def number(value: Any) -> float | None:
    """A finite JSON number as a float; None for null, booleans, strings, non-finite or out-of-range values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        v = float(value)
    except OverflowError:  # an integer beyond the float range
        return None
    return v if math.isfinite(v) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    """``str(value)``, or None for null and other empty values."""
    return str(value) if value else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def _at_index(rows: list[Any], i: int, empty: Any) -> Any:
    return rows[i] if 0 <= i < len(rows) else empty


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A figure with its interval: a Proportion (``value``, ``ci_low``, ``ci_high``, ``k``, ``n``), a ratio
    (``high`` None = unbounded), or a bare number (``bare``: no interval recorded). ``value`` None: undefined."""

    value: float | None = None
    low: float | None = None
    high: float | None = None
    k: int | None = None
    n: int | None = None
    bare: bool = False

    @classmethod
    def read(cls, entry: Any) -> Estimate:
        if isinstance(entry, dict):
            return cls(number(entry.get("value")), number(entry.get("ci_low")), number(entry.get("ci_high")),
                       _int(entry.get("k")), _int(entry.get("n")))
        return cls(number(entry), bare=True)


def _estimates(value: Any) -> dict[str, Estimate]:
    return {str(k): Estimate.read(v) for k, v in _dict(value).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class RadiusRow:
    """``per_radius[i]`` of a model block: ``worst`` and the cascade's cumulative ``after_attack`` figures
    (``alone``: per-attack figures of results written before the cascade, absent in schema 1 files)."""

    worst: Estimate = Estimate()
    after_attack: dict[str, Estimate] = dataclasses.field(default_factory=dict)
    alone: dict[str, Estimate] = dataclasses.field(default_factory=dict)

    @classmethod
    def read(cls, row: dict[str, Any]) -> RadiusRow:
        return cls(Estimate.read(row.get("worst")), _estimates(row.get("after_attack")), _estimates(row.get("per_attack")))

    def attack(self, name: str) -> Estimate:
        """``name``'s robust accuracy: the attack alone where recorded, else cumulative."""
        return self.alone.get(name) or self.after_attack.get(name) or Estimate()


@dataclasses.dataclass(frozen=True)
class CertRow:
    """``certification.per_radius[i]``; ``numbers``: its numeric keys (``certified_but_broken``, ``falsified``,
    ``unknown``, ``linear_region_fraction``, ``mean_unstable_relus``, ``total_relus``, ...)."""

    certified: Estimate = Estimate()
    empirical: Estimate = Estimate()
    numbers: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def read(cls, row: dict[str, Any]) -> CertRow:
        nums = {k: v for k, x in row.items() if (v := number(x)) is not None}
        return cls(Estimate.read(row.get("certified")), Estimate.read(row.get("empirical")), nums)


@dataclasses.dataclass(frozen=True)
class Certification:
    """A model block's ``certification``: ``ok`` when the bounds ran; else ``reason`` says why not."""

    ok: bool
    method: str | None
    reason: str | None
    rows: list[CertRow]

    @classmethod
    def read(cls, c: dict[str, Any]) -> Certification:
        reason = _text(c.get("reason")) or _text(c.get("status"))
        return cls(c.get("status") == "ok", _text(c.get("method")), reason, [CertRow.read(r) for r in _dicts(c.get("per_radius"))])

    def row(self, i: int) -> CertRow:
        return _at_index(self.rows, i, CertRow())


@dataclasses.dataclass(frozen=True)
class PerClass:
    """A model block's ``per_class`` counts: per label in ``classes``, ``n`` samples, ``clean_correct`` and
    ``robust[i]`` (robust at the ``i``-th radius) counts. Read only when every list has the right length."""

    classes: list[int]
    n: list[int]
    clean_correct: list[int]
    robust: list[list[int]]

    @classmethod
    def read(cls, p: Any, n_radii: int) -> PerClass | None:
        d = _dict(p)

        def ints(v: Any) -> list[int] | None:
            if not isinstance(v, list) or any(_int(x) is None for x in v):
                return None
            return [int(x) for x in v]

        classes, n, clean = ints(d.get("classes")), ints(d.get("n")), ints(d.get("clean_correct"))
        rob = d.get("robust")
        robust = [ints(r) for r in rob] if isinstance(rob, list) else []
        if classes is None or n is None or clean is None or not classes or len(robust) != n_radii:
            return None
        if any(len(x) != len(classes) for x in [n, clean, *[r or [] for r in robust]]):
            return None
        return cls(classes, n, clean, [list(r or []) for r in robust])


@dataclasses.dataclass(frozen=True)
class ModelBlock:
    """``teacher`` / ``student``: ``info`` is the provenance object (``model``); ``rejected_adversarials``
    maps ``attack@radius`` to a count."""

    info: dict[str, Any]
    clean: Estimate
    rows: list[RadiusRow]
    certification: Certification | None
    rejected_adversarials: dict[str, Any]
    timings: dict[str, Any]
    per_class: PerClass | None = None

    @classmethod
    def read(cls, m: dict[str, Any]) -> ModelBlock:
        rows = m.get("per_radius")
        rows = [RadiusRow.read(r) if isinstance(r, dict) else RadiusRow() for r in rows] if isinstance(rows, list) else []
        cert = m.get("certification")
        return cls(_dict(m.get("model")), Estimate.read(m.get("clean")), rows,
                   Certification.read(cert) if isinstance(cert, dict) else None,
                   _dict(m.get("rejected_adversarials")), _dict(m.get("timings")), PerClass.read(m.get("per_class"), len(rows)))

    def row(self, i: int) -> RadiusRow:
        """Figures at the ``i``-th radius (empty when absent)."""
        return _at_index(self.rows, i, RadiusRow())


@dataclasses.dataclass(frozen=True)
class TransferRow:
    """``transfer[i]``: ``ratio`` (None when not recorded), ``lost`` and ``gained`` (shares of all samples);
    ``lost_of_teacher_robust``: the lost samples' share of the teacher-robust ones (None when not recorded)."""

    ratio: Estimate | None
    lost: Estimate
    gained: Estimate
    lost_of_teacher_robust: float | None = None

    @classmethod
    def read(cls, t: dict[str, Any]) -> TransferRow:
        ratio = t.get("ratio")
        return cls(None if ratio is None else Estimate.read(ratio), Estimate.read(t.get("lost")), Estimate.read(t.get("gained")),
                   number(_dict(t.get("lost")).get("of_teacher_robust")))

    def metric(self, name: str) -> Estimate:
        """``ratio``, ``lost`` or ``gained`` by name (an empty estimate for another name or no ratio)."""
        found = {"ratio": self.ratio, "lost": self.lost, "gained": self.gained}.get(name)
        return found if found is not None else Estimate()


@dataclasses.dataclass(frozen=True)
class GateVerdict:
    """``gates[i]``: ``short_by`` (point estimates), ``bound_short_by`` (95% bounds) and ``samples_needed``
    are None when not recorded (results of earlier versions) or not applicable."""

    text: str
    passed: bool
    reason: str
    short_by: float | None = None
    bound_short_by: float | None = None
    samples_needed: int | None = None

    @classmethod
    def read(cls, g: dict[str, Any]) -> GateVerdict:
        return cls(str(g.get("gate", "?")), bool(g.get("passed")), str(g.get("reason", "")),
                   number(g.get("short_by")), number(g.get("bound_short_by")), _int(g.get("samples_needed")))


@dataclasses.dataclass(frozen=True)
class DefaultVerdict:
    """``default_verdict``: robustness kept (student / teacher worst case) at the largest radius against
    ``threshold``, judged like the gate ``expr`` (``gate``); ``enforced``: it decides the exit code."""

    expr: str
    radius: float | None
    threshold: float | None
    kept: float | None
    passed: bool | None
    enforced: bool
    gate: GateVerdict | None

    @classmethod
    def read(cls, d: dict[str, Any]) -> DefaultVerdict:
        passed = d.get("passed")
        gate = d.get("gate")
        return cls(str(d.get("expr", "")), number(d.get("radius")), number(d.get("threshold")), number(d.get("kept")),
                   passed if isinstance(passed, bool) else None, d.get("enforced") is True,
                   GateVerdict.read(gate) if isinstance(gate, dict) else None)


@dataclasses.dataclass(frozen=True)
class Prop2Row:
    """``prop2.per_radius[i]``: the Proposition-2 ``summary`` at one radius."""

    radius: float
    summary: dict[str, Any]

    def mean(self, term: str) -> float | None:
        """Mean of a per-sample term (``llm_s``, ``bound``, ...), or the term itself when it is a number."""
        v = self.summary.get(term)
        return number(v.get("mean") if isinstance(v, dict) else v)

    def median(self, term: str) -> float | None:
        v = self.summary.get(term)
        return number(v.get("median")) if isinstance(v, dict) else None

    def count(self, key: str) -> int | None:
        """An integer of the summary (``violations``, ``n``)."""
        return _int(self.summary.get(key))

    def text(self, key: str) -> str | None:
        """A text of the summary (``dual_norm``, ``note``)."""
        return _text(self.summary.get(key))


@dataclasses.dataclass(frozen=True)
class TrainingLog:
    """``training`` (or ``training_log.json``): per-epoch ``records`` of a repair run and the rest (``meta``)."""

    records: list[dict[str, Any]]
    meta: dict[str, Any]

    @classmethod
    def read(cls, t: Any) -> TrainingLog | None:
        if isinstance(t, list):
            return cls(_dicts(t), {})
        if isinstance(t, dict):
            return cls(_dicts(t.get("records") if isinstance(t.get("records"), list) else t.get("log")), t)
        return None

    @property
    def method(self) -> str | None:
        return _text(_dict(self.meta.get("config")).get("method")) or _text(self.meta.get("method"))


@dataclasses.dataclass(frozen=True)
class Results:
    """A typed, read-only view of a results dict (``raw``); :func:`check_schema` is the caller's business."""

    raw: dict[str, Any]

    def section(self, name: str) -> dict[str, Any]:
        """A free-form object section as stored: ``config``, ``data``, ``environment``, ``timings`` (empty if absent)."""
        return _dict(self.raw.get(name))

    @property
    def kind(self) -> str:
        return str(self.raw.get("kind", ""))

    @property
    def is_repair(self) -> bool:
        """A ``robkd repair`` result (or any result with a training log)."""
        return bool(self.raw.get("training")) or "repair" in self.kind

    @property
    def radii(self) -> list[float]:
        """Audited radii, ascending."""
        r = self.raw.get("radii")
        return [v for v in map(number, r) if v is not None] if isinstance(r, list) else []

    @property
    def attacks(self) -> list[str]:
        """The attack suite in the order it ran (``cascade_order``; else as given)."""
        for a in (self.raw.get("cascade_order"), self.raw.get("attacks"), self.section("config").get("attacks")):
            if isinstance(a, list) and a:
                return [str(x) for x in a]
        return []

    @property
    def cumulative(self) -> bool:
        """True when per-attack figures are the cascade's cumulative worst case (``after_attack``)."""
        return not self.teacher.row(0).alone

    @property
    def norm(self) -> str:
        return str(self.raw.get("norm") or self.section("config").get("norm") or "Linf")

    def model(self, role: str) -> ModelBlock:
        return ModelBlock.read(_dict(self.raw.get(role)))

    @property
    def teacher(self) -> ModelBlock:
        return self.model("teacher")

    @property
    def student(self) -> ModelBlock:
        return self.model("student")

    @property
    def transfer(self) -> list[TransferRow]:
        t = self.raw.get("transfer")
        return [TransferRow.read(_dict(x)) for x in t] if isinstance(t, list) else []

    @property
    def gates(self) -> list[GateVerdict]:
        return [GateVerdict.read(g) for g in _dicts(self.raw.get("gates"))]

    @property
    def default_verdict(self) -> DefaultVerdict | None:
        """The default transfer verdict (None in results written before it existed)."""
        d = self.raw.get("default_verdict")
        return DefaultVerdict.read(d) if isinstance(d, dict) else None

    @property
    def strict(self) -> bool:
        """The sanity checks ran under ``--strict``."""
        return bool(self.section("sanity").get("strict"))

    @property
    def sanity_flags(self) -> list[dict[str, Any]]:
        """Sanity flags (objects: code, message, suggestion, model, ``handled_by``, ...)."""
        s = self.raw.get("sanity")
        return _dicts(s.get("flags") if isinstance(s, dict) else s)

    @property
    def sanity_checks(self) -> list[Any]:
        checks = self.section("sanity").get("checks")
        return checks if isinstance(checks, list) else []

    @property
    def prop2(self) -> list[Prop2Row]:
        """Proposition-2 summaries (radii that are numbers only)."""
        rows = _dicts(self.section("prop2").get("per_radius"))
        return [Prop2Row(r, _dict(e.get("summary"))) for e in rows if (r := number(e.get("radius"))) is not None]

    @property
    def training(self) -> TrainingLog | None:
        return TrainingLog.read(self.raw.get("training"))

    @property
    def before(self) -> Results | None:
        """The pre-repair audit of a repair result."""
        b = self.raw.get("before")
        return Results(b) if isinstance(b, dict) else None

    @property
    def created(self) -> str | None:
        return _text(self.raw.get("created")) or _text(self.raw.get("timestamp"))

    @property
    def robkd_version(self) -> str | None:
        return _text(self.raw.get("robkd_version")) or _text(self.section("environment").get("robkd"))

    @property
    def command(self) -> list[str] | str | None:
        c = self.raw.get("command")
        return [str(x) for x in c] if isinstance(c, list) else _text(c)

    @property
    def resumed(self) -> list[str]:
        r = self.raw.get("resumed")
        return [str(x) for x in r] if isinstance(r, list) else []
