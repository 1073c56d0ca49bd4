"""Reading and validating results files: the schema's constants, its one error type, the guarded reader.

:func:`load_results` is the one reader of results files (``robkd report``, ``AuditResult.load``): the
guarded JSON reader of :mod:`robkd.utils.io`, then :func:`validate_results`, which refuses a file that
breaks the schema with one line naming the first offending key path. :func:`check_schema` is the minimum
a renderer needs. ``AuditResult.write`` validates what it writes with the same rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from robkd.errors import UsageError
from robkd.report.escape import esc_text
from robkd.utils.io import read_json

#: the version :meth:`AuditResult.write` writes; bump on any incompatible change of the layout
SCHEMA_VERSION = "1"
#: results.json schema versions this robkd reads
SUPPORTED_SCHEMA_VERSIONS = (SCHEMA_VERSION,)
KINDS = ("robkd-audit", "robkd-repair")
NORMS = ("Linf", "L2")
ROLES = ("teacher", "student")
RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.safetensors"

Check = Callable[[Any, str], Any]
_MISSING = object()


class ResultsError(UsageError):
    """A results file is missing, unreadable, not strict JSON, or breaks the results schema."""


# ----------------------------------------------------------------------------- entry points
def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a results.json (a directory holding one is accepted too)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    return validate_results(read_json(p, what="results file", error=ResultsError), str(p))


def check_schema(result: Any, where: str = "results") -> dict[str, Any]:
    """The minimum every renderer input needs: an object of a supported ``schema_version`` with
    ``teacher`` and ``student`` objects. Raises :class:`ResultsError`."""
    if not isinstance(result, dict):
        raise ResultsError(f"{where}: expected a JSON object, got {_show(result)}")
    version = result.get("schema_version")
    if version is None:
        raise ResultsError(f"{where}: no 'schema_version' key: not a robkd results file")
    if str(version) not in SUPPORTED_SCHEMA_VERSIONS:
        raise ResultsError(
            f"{where}: unsupported results schema_version {esc_text(repr(version)[:40], keep='')}; this robkd reads "
            f"{', '.join(SUPPORTED_SCHEMA_VERSIONS)} (re-run the audit, or use a matching robkd version)"
        )
    for key in ROLES:
        if not isinstance(result.get(key), dict):
            raise ResultsError(f"{where}: missing or malformed {key!r} section")
    return result


def validate_results(result: Any, where: str = "results") -> dict[str, Any]:
    """``result`` if it follows the results schema, else :class:`ResultsError` naming the first bad key path."""
    check_schema(result, where)
    try:
        _result(result, "", nested=False)
    except _Bad as bad:
        raise ResultsError(f"{where} breaks the results schema at {bad.path or 'the top level'}: {bad}") from None
    return result


# ----------------------------------------------------------------------------- validation
class _Bad(Exception):
    """A schema violation at ``path`` (turned into a :class:`ResultsError` by :func:`validate_results`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def _at(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    name = esc_text(key, keep="")
    name = name if len(name) <= 60 else name[:57] + "..."
    return f"{path}.{name}" if path else name


def _show(value: Any) -> str:
    if value is _MISSING:
        return "nothing (the key is missing)"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, str):
        text = esc_text(repr(value), keep="")
        return "the string " + (text if len(text) <= 40 else text[:37] + "...")
    if isinstance(value, (int, float)):
        return repr(value)[:40]
    return "a list" if isinstance(value, list) else "an object"


def _expect(path: str, what: str, value: Any) -> NoReturn:
    raise _Bad(path, f"expected {what}, got {_show(value)}")


def _field(d: dict[str, Any], key: str, path: str, check: Check, *, required: bool = True) -> Any:
    """``check(d[key])``; a missing key is an error when ``required``, else None."""
    value = d.get(key, _MISSING)
    if value is _MISSING and not required:
        return None
    return check(value, _at(path, key))


def _obj(v: Any, p: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        _expect(p, "an object", v)
    return v


def _str(v: Any, p: str) -> str:
    if not isinstance(v, str):
        _expect(p, "a string", v)
    return v


def _bool(v: Any, p: str) -> bool:
    if not isinstance(v, bool):
        _expect(p, "true or false", v)
    return v


def _count(v: Any, p: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        _expect(p, "a non-negative integer", v)
    return v


def _number(lo: float = float("-inf"), hi: float = float("inf"), what: str = "a number") -> Check:
    def check(v: Any, p: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            _expect(p, what, v)
        return float(v)

    return check


_unit = _number(0.0, 1.0, "a number in [0, 1]")
_non_negative = _number(0.0, what="a number >= 0")


def _opt(check: Check) -> Check:
    """``check``, or null."""
    return lambda v, p: None if v is None else check(v, p)


def _one_of(choices: Sequence[str]) -> Check:
    def check(v: Any, p: str) -> str:
        if v not in choices:
            _expect(p, " or ".join(repr(c) for c in choices), v)
        return v

    return check


def _list(item: Check, *, length: int | None = None, non_empty: bool = False) -> Check:
    def check(v: Any, p: str) -> list[Any]:
        if not isinstance(v, list):
            _expect(p, "a list", v)
        if non_empty and not v:
            raise _Bad(p, "expected a non-empty list, got []")
        if length is not None and len(v) != length:
            raise _Bad(p, f"expected {length} entries (one per radius), got {len(v)}")
        for i, x in enumerate(v):
            item(x, _at(p, i))
        return v

    return check


def _proportion(v: Any, p: str, *, extra: str | None = None) -> dict[str, Any]:
    """An accuracy: ``value`` (and ``ci_low``/``ci_high`` when given) in [0, 1], ``k <= n`` counts."""
    d = _obj(v, p)
    _field(d, "value", p, _unit)
    for key in ("ci_low", "ci_high") + ((extra,) if extra else ()):
        _field(d, key, p, _opt(_unit), required=False)
    k, n = _field(d, "k", p, _count, required=False), _field(d, "n", p, _count, required=False)
    if k is not None and n is not None and k > n:
        raise _Bad(_at(p, "k"), f"k = {k} exceeds n = {n}")
    return d


def _ratio(v: Any, p: str) -> None:
    d = _obj(v, p)
    for key in ("value", "ci_low", "ci_high"):
        _field(d, key, p, _opt(_non_negative), required=False)


def _radius_row(v: Any, p: str) -> None:
    d = _obj(v, p)
    _field(d, "worst", p, _proportion)
    for attack, entry in _field(d, "after_attack", p, _obj).items():
        _proportion(entry, _at(_at(p, "after_attack"), attack))


def _cert_row(v: Any, p: str) -> None:
    d = _obj(v, p)
    _field(d, "certified", p, _proportion)
    _field(d, "empirical", p, _proportion, required=False)


def _model(n_radii: int) -> Check:
    def certification(v: Any, p: str) -> None:
        d = _obj(v, p)
        if _field(d, "status", p, _str) == "ok":
            _field(d, "per_radius", p, _list(_cert_row, length=n_radii))

    def per_class(v: Any, p: str) -> None:
        d = _obj(v, p)
        c = len(_field(d, "classes", p, _list(_count)))
        for key in ("n", "clean_correct"):
            if len(_field(d, key, p, _list(_count))) != c:
                raise _Bad(_at(p, key), f"expected {c} entries (one per class)")
        for i, row in enumerate(_field(d, "robust", p, _list(_list(_count), length=n_radii))):
            if len(row) != c:
                raise _Bad(_at(_at(p, "robust"), i), f"expected {c} entries (one per class)")

    def check(v: Any, p: str) -> None:
        d = _obj(v, p)
        _field(d, "model", p, _obj, required=False)
        _field(d, "clean", p, _proportion)
        _field(d, "per_radius", p, _list(_radius_row, length=n_radii))
        _field(d, "certification", p, _opt(certification), required=False)
        _field(d, "per_class", p, _opt(per_class), required=False)
        _field(d, "cache", p, _opt(_cache_record), required=False)
        _field(d, "self_test", p, _opt(_self_test), required=False)
        _field(d, "corruption", p, _opt(_corruption), required=False)

    return check


def _self_test(v: Any, p: str) -> None:
    """``<role>.self_test`` (absent in results of earlier versions): per attack, found <= valid and the rate."""
    d = _obj(v, p)
    if _field(d, "status", p, _one_of(("ok", "not_applicable"))) != "ok":
        _field(d, "reason", p, _str)
        return
    _field(d, "threshold", p, _unit)
    for attack, entry in _field(d, "attacks", p, _obj).items():
        q = _at(_at(p, "attacks"), attack)
        e = _obj(entry, q)
        found, valid = _field(e, "found", q, _count), _field(e, "valid", q, _count)
        if found > valid:
            raise _Bad(_at(q, "found"), f"found = {found} exceeds valid = {valid}")
        _field(e, "rate", q, _opt(_unit))


def _corruption(v: Any, p: str) -> None:
    """``<role>.corruption`` (absent in results of earlier versions): accuracies per corruption and severity."""
    d = _obj(v, p)
    if _field(d, "status", p, _str) != "ok":
        return
    names = _field(d, "corruptions", p, _list(_str, non_empty=True))
    sevs = [str(s) for s in _field(d, "severities", p, _list(_count, non_empty=True))]
    per = _field(d, "per_corruption", p, _obj)
    for name in names:
        q = _at(_at(p, "per_corruption"), name)
        rows = _field(_obj(per.get(name), q), "per_severity", q, _obj)
        for s in sevs:
            _proportion(rows.get(s), _at(_at(q, "per_severity"), s))
    means = _field(d, "per_severity", p, _obj)
    for s in sevs:
        _proportion(means.get(s), _at(_at(p, "per_severity"), s))
    _field(d, "mean", p, _proportion)


def _transfer_attack(v: Any, p: str, n_radii: int) -> None:
    """``transfer_attack`` (absent in results of earlier versions): per direction, one row per radius."""
    d = _obj(v, p)
    for key, entry in _field(d, "directions", p, _obj).items():
        q = _at(_at(p, "directions"), key)
        e = _obj(entry, q)
        _field(e, "source", q, _one_of(ROLES))
        _field(e, "target", q, _one_of(ROLES))
        for i, row in enumerate(_field(e, "per_radius", q, _list(_obj, length=n_radii))):
            r = _at(_at(q, "per_radius"), i)
            for key2 in ("attacked", "reused", "reused_broken", "pgd", "pgd_broken", "broken"):
                _field(row, key2, r, _count)


def _cache_record(v: Any, p: str) -> None:
    """``<role>.cache``: where the block came from (absent in results of earlier versions)."""
    d = _obj(v, p)
    _field(d, "hit", p, _bool)
    _field(d, "key", p, _opt(_str), required=False)
    _field(d, "created", p, _opt(_str), required=False)
    _field(d, "same_as", p, _opt(_one_of(ROLES)), required=False)


def _transfer_row(v: Any, p: str) -> None:
    d = _obj(v, p)
    _field(d, "ratio", p, _ratio)
    _field(d, "lost", p, lambda x, q: _proportion(x, q, extra="of_teacher_robust"))
    _field(d, "gained", p, lambda x, q: _proportion(x, q, extra="of_student_robust"))


def _gate(v: Any, p: str) -> None:
    d = _obj(v, p)
    _field(d, "gate", p, _str)
    _field(d, "passed", p, _bool)
    _field(d, "reason", p, _str)
    for key in ("short_by", "bound_short_by"):
        _field(d, key, p, _opt(_number()), required=False)
    _field(d, "samples_needed", p, _opt(_count), required=False)


def _default_verdict(v: Any, p: str) -> None:
    """``default_verdict``: the transfer verdict judged without a gate (absent in results of earlier versions)."""
    d = _obj(v, p)
    _field(d, "expr", p, _str)
    _field(d, "radius", p, _non_negative)
    _field(d, "threshold", p, _non_negative)
    _field(d, "kept", p, _opt(_non_negative))
    _field(d, "passed", p, _opt(_bool))
    _field(d, "enforced", p, _bool)
    _field(d, "gate", p, _opt(_gate))


def _rejudged(v: Any, p: str) -> None:
    d = _obj(v, p)
    _field(d, "command", p, _opt(_list(_str)))
    _field(d, "created", p, _str, required=False)


def _sanity(v: Any, p: str) -> None:
    d = _obj(v, p)
    _field(d, "flags", p, _list(_obj))
    _field(d, "strict", p, _bool, required=False)


def _prop2(v: Any, p: str) -> None:
    def row(x: Any, q: str) -> None:
        e = _obj(x, q)
        _field(e, "radius", q, _non_negative)
        _field(e, "summary", q, _obj)

    _field(_obj(v, p), "per_radius", p, _list(row))


def _training(v: Any, p: str) -> None:
    if isinstance(v, list):
        _list(_obj)(v, p)
    elif isinstance(v, dict):
        _field(v, "records", p, _list(_obj), required=False)
    else:
        _expect(p, "an object or a list", v)


def _radii(norm: str) -> Check:
    top = 1.0 if norm == "Linf" else float("inf")
    item = _number(0.0, top, "a radius in [0, 1]" if norm == "Linf" else "a radius >= 0")

    def check(v: Any, p: str) -> list[float]:
        radii = _list(item, non_empty=True)(v, p)
        for i in range(1, len(radii)):
            if radii[i] <= radii[i - 1]:
                raise _Bad(_at(p, i), f"radii must be ascending, got {radii[i]!r} after {radii[i - 1]!r}")
        return radii

    return check


def _result(v: Any, p: str, *, nested: bool) -> None:
    """A whole results object; ``nested``: the ``before`` audit of a repair result."""
    d = _obj(v, p)
    _field(d, "schema_version", p, _one_of(SUPPORTED_SCHEMA_VERSIONS))
    _field(d, "kind", p, _one_of(KINDS[:1] if nested else KINDS))
    _field(d, "created", p, _str, required=False)
    _field(d, "command", p, _opt(_list(_str)))
    for key in ("config", "data"):
        _field(d, key, p, _obj)
    for key in ("environment", "timings"):
        _field(d, key, p, _obj, required=False)
    norm = _field(d, "norm", p, _one_of(NORMS))
    n = len(_field(d, "radii", p, _radii(norm)))
    _field(d, "radii_text", p, _list(_str, length=n))
    _field(d, "attacks", p, _list(_str, non_empty=True))
    _field(d, "cascade_order", p, _list(_str, non_empty=True), required=False)
    _field(d, "confidence", p, _number(0.0, 1.0, "a number in [0, 1]"), required=False)
    for role in ROLES:
        _field(d, role, p, _model(n))
    _field(d, "transfer", p, _list(_transfer_row, length=n))
    _field(d, "prop2", p, _opt(_prop2), required=False)
    _field(d, "transfer_attack", p, _opt(lambda x, q: _transfer_attack(x, q, n)), required=False)
    _field(d, "corruption_transfer", p, _opt(_obj), required=False)
    _field(d, "sanity", p, _sanity)
    _field(d, "gates", p, _list(_gate))
    _field(d, "gates_passed", p, _bool, required=False)
    _field(d, "default_verdict", p, _opt(_default_verdict), required=False)
    _field(d, "rejudged", p, _rejudged, required=False)
    _field(d, "exit_code", p, _count, required=False)
    _field(d, "resumed", p, _list(_str), required=False)
    if nested:
        if "before" in d:
            raise _Bad(_at(p, "before"), "a before-repair audit cannot hold another 'before'")
        return
    _field(d, "before", p, lambda x, q: _result(x, q, nested=True), required=False)
    _field(d, "training", p, _training, required=False)
