"""The ``certify.json`` schema ("robkd-certify/1", docs/certify-schema.md): constants and the validator.

:func:`certify_errors` lists every violation (path: problem); :func:`check_certify` raises
:class:`CertifyJsonError` with the first few. ``robkd certify`` checks what it writes (a violation is a
robkd bug); readers of a certify.json can check what they read. No torch, no robkd.bounds import.
"""

from __future__ import annotations

import math
from typing import Any, Callable

SCHEMA = "robkd-certify/1"
CONFIDENCE = 0.95
VERDICTS = ("certified", "falsified", "unknown", "skipped")
METHODS = ("ibp", "crown", "alpha-crown", "milp", "smoothing", "budget")
DECIDERS = ("ibp", "crown-ibp", "counterexample", "crown", "alpha-crown", "milp", "smoothing", "larger-radius",
            "misclassified", "skipped", "not-requested")


class CertifyJsonError(ValueError):
    """A certify.json document does not follow the schema."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _opt(f: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or f(v)


def _list_of(f: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(f(e) for e in v)


_TOP: dict[str, tuple[bool, Callable[[Any], bool]]] = {  # key -> (required, check)
    "schema": (True, lambda v: v == SCHEMA),
    "robkd_version": (True, _is_str),
    "command": (True, _list_of(_is_str)),
    "model": (True, _is_str),
    "model_sha256": (True, lambda v: _is_str(v) and len(v) == 64),
    "method": (True, lambda v: v in METHODS),
    "budget": (True, _opt(lambda v: isinstance(v, dict) and set(v) == {"seconds_per_sample", "memory_bytes"})),
    "backend": (True, _opt(_is_str)),
    "intermediate": (True, _opt(lambda v: v in ("crown", "ibp"))),
    "norm": (True, lambda v: v in ("Linf", "L2")),
    "data": (True, _is_str),
    "split": (True, _is_str),
    "n": (True, lambda v: _is_int(v) and v >= 1),
    "seed": (True, _is_int),
    "sample_indices": (True, _list_of(_is_int)),
    "labels": (True, _list_of(_is_int)),
    "radii": (True, lambda v: isinstance(v, list) and bool(v) and all(_is_num(e) and e >= 0 for e in v)),
    "confidence": (True, lambda v: _is_num(v) and 0 < v < 1),
    "results": (True, lambda v: isinstance(v, list)),
    "detail": (True, lambda v: isinstance(v, dict)),
    "linear_region_radius": (True, _opt(lambda v: isinstance(v, dict))),
    "seconds": (True, lambda v: _is_num(v) and v >= 0),
}

_FRACTION = ("k", "n", "value", "ci_low", "ci_high")

_RESULT: dict[str, tuple[bool, Callable[[Any], bool]]] = {
    "eps": (True, lambda v: _is_num(v) and v >= 0),
    "eps_str": (True, _is_str),
    "norm": (True, lambda v: v in ("Linf", "L2")),
    "n": (True, lambda v: _is_int(v) and v >= 1),
    "certified": (True, _is_int),
    "falsified": (True, _is_int),
    "unknown": (True, _is_int),
    "skipped": (True, _is_int),
    "certified_accuracy": (True, _is_num),
    "certified_fraction": (True, lambda v: isinstance(v, dict)),
    "clean_accuracy": (True, _opt(_is_num)),
    "clean_fraction": (True, _opt(lambda v: isinstance(v, dict))),
    "seconds": (True, lambda v: _is_num(v) and v >= 0),
    "per_sample": (True, lambda v: isinstance(v, dict)),
    "method": (True, lambda v: v in METHODS),
    "decided_counts": (True, lambda v: isinstance(v, dict) and all(_is_int(c) for c in v.values())),
    "backend": (False, _opt(_is_str)),
    "linear_region_fraction": (False, _opt(_is_num)),
    "mean_unstable_relus": (False, _opt(_is_num)),
    "total_relus": (False, _opt(_is_int)),
    "milp": (False, _list_of(lambda e: isinstance(e, dict))),
}

_PER_SAMPLE: dict[str, tuple[bool, Callable[[Any], bool]]] = {  # each a list of n entries
    "status": (True, lambda v: v in VERDICTS),
    "certified": (True, _is_bool),
    "margin_lb": (True, _opt(_is_num)),
    "decided_by": (True, lambda v: v in DECIDERS),
    "clean_correct": (True, _is_bool),  # the whole list may be null
    "margin_exact": (False, _is_bool),
    "unstable_relus": (False, _is_int),
    "linear_region": (False, _is_bool),
    "fallbacks": (False, _is_str),
    "seconds": (False, lambda v: _is_num(v) and v >= 0),
    "smoothing_radius": (False, _opt(_is_num)),
}


def _check_keys(d: dict, spec: dict, path: str, errors: list[str]) -> None:
    for key, (required, ok) in spec.items():
        if key not in d:
            if required:
                errors.append(f"{path}.{key}: missing")
        elif not ok(d[key]):
            errors.append(f"{path}.{key}: bad value {str(d[key])[:60]!r}")
    for key in d:
        if key not in spec:
            errors.append(f"{path}.{key}: unknown key")


def _check_fraction(f: Any, k: int, n: int, path: str, errors: list[str]) -> None:
    if not isinstance(f, dict) or set(f) != set(_FRACTION):
        errors.append(f"{path}: must have exactly {', '.join(_FRACTION)}")
        return
    if f["k"] != k or f["n"] != n:
        errors.append(f"{path}: k/n {f['k']}/{f['n']} do not match the counts {k}/{n}")
    if n and (f["value"] != k / n or not (_is_num(f["ci_low"]) and _is_num(f["ci_high"]))
              or not 0 <= f["ci_low"] <= f["value"] <= f["ci_high"] <= 1):
        errors.append(f"{path}: value must be k/n exactly inside [ci_low, ci_high] within [0, 1]")


def _check_result(r: Any, n: int, norm: str, path: str, errors: list[str]) -> None:
    if not isinstance(r, dict):
        errors.append(f"{path}: must be an object")
        return
    before = len(errors)
    _check_keys(r, _RESULT, path, errors)
    if len(errors) > before:
        return
    if r["n"] != n or r["norm"] != norm:
        errors.append(f"{path}: n/norm {r['n']}/{r['norm']} differ from the document's {n}/{norm}")
    if sum(r[v] for v in VERDICTS) != r["n"]:
        errors.append(f"{path}: verdict counts do not add up to n")
    if r["certified_accuracy"] != r["certified"] / r["n"]:
        errors.append(f"{path}.certified_accuracy: must be certified / n exactly")
    _check_fraction(r["certified_fraction"], r["certified"], r["n"], f"{path}.certified_fraction", errors)
    per = r["per_sample"]
    _check_keys(per, {k: (req, _opt(_list_of(lambda v: True))) for k, (req, _) in _PER_SAMPLE.items()},
                f"{path}.per_sample", errors)
    for key, (_, ok) in _PER_SAMPLE.items():
        lst = per.get(key)
        if lst is None:
            continue
        if not isinstance(lst, list) or len(lst) != r["n"]:
            errors.append(f"{path}.per_sample.{key}: must be a list of n={r['n']} entries")
        elif not all(ok(v) for v in lst):
            errors.append(f"{path}.per_sample.{key}: bad entry")
    status = per.get("status")
    if isinstance(status, list) and len(status) == r["n"]:
        for v in VERDICTS:
            if sum(s == v for s in status) != r[v]:
                errors.append(f"{path}: count {v}={r[v]} does not match per_sample.status")
        cert = per.get("certified")
        if isinstance(cert, list) and cert != [s == "certified" for s in status]:
            errors.append(f"{path}.per_sample.certified: must equal status == 'certified'")
        clean = per.get("clean_correct")
        if isinstance(clean, list) and len(clean) == r["n"]:
            _check_fraction(r["clean_fraction"], sum(bool(c) for c in clean), r["n"], f"{path}.clean_fraction", errors)
    if sum(r["decided_counts"].values()) != r["n"]:
        errors.append(f"{path}.decided_counts: must add up to n")


def certify_errors(doc: Any) -> list[str]:
    """Every violation of the certify.json schema in ``doc`` (empty when valid)."""
    if not isinstance(doc, dict):
        return ["certify.json: must be a JSON object"]
    errors: list[str] = []
    _check_keys(doc, _TOP, "certify", errors)
    if errors:
        return errors
    n = doc["n"]
    if len(doc["sample_indices"]) != n or len(doc["labels"]) != n:
        errors.append("certify: sample_indices and labels must have n entries")
    if len(doc["results"]) != len(doc["radii"]):
        errors.append("certify.results: one entry per radius")
    for i, (r, eps) in enumerate(zip(doc["results"], doc["radii"])):
        _check_result(r, n, doc["norm"], f"certify.results[{i}]", errors)
        if isinstance(r, dict) and r.get("eps") != eps:
            errors.append(f"certify.results[{i}].eps: {r.get('eps')!r} is not radii[{i}] = {eps!r}")
        if isinstance(r, dict) and r.get("method") not in (None, doc["method"]):
            errors.append(f"certify.results[{i}].method: differs from the document's method")
    return errors


def check_certify(doc: Any) -> None:
    """Raise :class:`CertifyJsonError` when ``doc`` breaks the schema (the first five problems)."""
    errors = certify_errors(doc)
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise CertifyJsonError("certify.json does not follow " + SCHEMA + ": " + "; ".join(errors[:5]) + more)
