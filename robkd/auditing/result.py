"""The outcome of an audit: a JSON-ready dict (``results.json``) plus per-sample tensors.

The layout of ``results.json`` is documented key by key in ``docs/results-schema.md``;
bump :data:`SCHEMA_VERSION` on any incompatible change.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from robkd.auditing.gates import GateResult, Interval, Ref, match_radius
from robkd.errors import EXIT_GATE_FAILED, EXIT_OK, EXIT_SANITY, UsageError
from robkd.types import format_radius

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = "1"
RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.safetensors"



class AuditResult:
    """An audit's figures (``to_dict()``, the content of ``results.json``) and per-sample tensors.

    ``tensors`` maps names such as ``student.broken_by`` to tensors (see the schema
    document, section *samples.safetensors*).
    """

    def __init__(self, data: dict[str, Any], tensors: dict[str, Any] | None = None, gates: list[GateResult] | None = None) -> None:
        self._data = data
        self.tensors = dict(tensors or {})
        self.gates = list(gates or [])

    # ------------------------------------------------------------------ access
    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable result (a deep copy)."""
        return json.loads(json.dumps(self._data, allow_nan=False))

    @property
    def radii(self) -> list[float]:
        """Audited radii, ascending."""
        return list(self._data["radii"])

    @property
    def gates_passed(self) -> bool:
        """True when every gate passed (also when there are no gates)."""
        return all(g["passed"] for g in self._data.get("gates", []))

    @property
    def sanity_flags(self) -> list[dict[str, Any]]:
        """Sanity flags raised on the evaluation (each a dict with code/message/suggestion/model, and
        ``handled_by`` when the audit's settings already answer the flag: it then does not fail ``strict``)."""
        return list(self._data.get("sanity", {}).get("flags", []))

    @property
    def exit_code(self) -> int:
        """0 all gates pass; 1 a gate failed; 3 sanity flags under ``strict`` (takes precedence)."""
        if self._data["config"].get("strict") and any(not f.get("handled_by") for f in self.sanity_flags):
            return EXIT_SANITY
        return EXIT_OK if self.gates_passed else EXIT_GATE_FAILED

    def metric(self, name: str | Ref) -> Interval | None:
        """A metric by reference, e.g. ``metric("student.worst@8/255")`` -> :class:`Interval` (None if undefined)."""
        from robkd.auditing.gates import _read_ref

        if isinstance(name, str):
            text = name.strip()
            ident = text.split(".", 1)[0]
            ref, end = _read_ref(text, 0, ident)
            if end != len(text):
                raise UsageError(f"bad metric reference {name!r}")
        else:
            ref = name
        return lookup_metric(self._data, ref)

    def attach_before(self, before: "AuditResult | dict[str, Any]") -> None:
        """Make this a repair result: ``kind`` becomes ``robkd-repair`` and ``before`` holds the pre-repair audit."""
        b = before.to_dict() if isinstance(before, AuditResult) else json.loads(json.dumps(before, allow_nan=False))
        if b.get("kind") != "robkd-audit":
            raise UsageError(f"the before-repair result must be a robkd-audit result, got kind {b.get('kind')!r}")
        b.pop("before", None)
        self._data["kind"] = "robkd-repair"
        self._data["before"] = b

    # ------------------------------------------------------------------ writing / reading
    def write(self, out_dir: str | Path, *, samples: bool = True) -> Path:
        """Write ``results.json`` and (``samples``) ``samples.safetensors`` into ``out_dir`` atomically; returns the json path."""
        from robkd.utils.io import atomic_write_bytes, atomic_write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if samples and self.tensors:
            from safetensors.torch import save

            tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
            atomic_write_bytes(out / SAMPLES_FILE, save(tensors, metadata={"schema_version": SCHEMA_VERSION}))
        atomic_write_json(out / RESULTS_FILE, self._data)
        return out / RESULTS_FILE

    @classmethod
    def load(cls, out_dir: str | Path, *, tensors: bool = True) -> "AuditResult":
        """Read an audit directory (or its results.json) written by :meth:`write`.

        The file goes through the one guarded reader of results files (:func:`robkd.report.schema.read_results`):
        missing, unreadable, non-strict or too deeply nested JSON, another schema version, or a file that breaks
        the schema raise :class:`~robkd.report.schema.ResultsError` (a :class:`UsageError`) with one line."""
        from robkd.report.schema import ResultsError, read_results

        out = Path(out_dir)
        path = out / RESULTS_FILE if out.is_dir() else out
        data = read_results(path)
        t: dict[str, Any] = {}
        samples = path.parent / SAMPLES_FILE
        if tensors and samples.is_file():
            from safetensors.torch import load_file

            try:
                t = load_file(str(samples))
            except Exception as exc:  # safetensors raises its own error type on a corrupt file
                raise ResultsError(f"cannot read {samples}: {type(exc).__name__}: {exc}") from exc
        return cls(data, t)


def _radius_index(data: dict[str, Any], radius: float | None) -> int | None:
    if radius is None:
        return None
    r = match_radius(radius, data["radii"])
    return None if r is None else data["radii"].index(r)


def _interval(entry: dict[str, Any] | None) -> Interval | None:
    if entry is None or entry.get("value") is None:
        return None
    lo = entry.get("ci_low")
    hi = entry.get("ci_high")
    return Interval(
        float(entry["value"]),
        float(lo) if lo is not None else -math.inf,
        float(hi) if hi is not None else math.inf,
    )


def lookup_metric(data: dict[str, Any], ref: Ref) -> Interval | None:
    """Resolve a gate reference against a results dict (None when undefined or absent)."""
    if ref.subject != "transfer" and ref.metric == "clean":
        return _interval(data[ref.subject]["clean"])
    i = _radius_index(data, ref.radius)
    if i is None:
        return None
    if ref.subject == "transfer":
        return _interval(data["transfer"][i].get(ref.metric))
    model = data[ref.subject]
    if ref.metric == "worst":
        return _interval(model["per_radius"][i]["worst"])
    if ref.metric == "certified":
        cert = model.get("certification") or {}
        if cert.get("status") != "ok":
            return None
        return _interval(cert["per_radius"][i]["certified"])
    return _interval(model["per_radius"][i]["after_attack"].get(ref.metric))


def gate_samples(data: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Callable[[Ref], tuple[Any, Any] | None]:
    """Per-sample outcomes of every gate metric (for the paired judgement), from an audit's tensors.

    Returns ``fn(ref) -> (numerator, denominator | None)`` as numpy arrays over the audited samples
    (None when the metric is undefined): indicator vectors for accuracies and transfer lost/gained,
    student/teacher robust indicators for ``transfer.ratio``."""

    def vec(key: str, i: int | None = None):
        t = tensors.get(key)
        if t is None:
            return None
        t = t if i is None else t[i]
        return t.detach().cpu().double().numpy()

    def fn(ref: Ref) -> tuple[Any, Any] | None:
        if ref.subject != "transfer" and ref.metric == "clean":
            v = vec(f"{ref.subject}.clean_correct")
            return None if v is None else (v, None)
        i = _radius_index(data, ref.radius)
        if i is None:
            return None
        if ref.subject == "transfer":
            rt, rs = vec("teacher.robust", i), vec("student.robust", i)
            if rt is None or rs is None:
                return None
            if ref.metric == "ratio":
                return rs, rt
            return (rt * (1 - rs), None) if ref.metric == "lost" else (rs * (1 - rt), None)
        if ref.metric == "worst":
            v = vec(f"{ref.subject}.robust", i)
        elif ref.metric == "certified":
            v = vec(f"{ref.subject}.certified", i)
        else:
            v = vec(f"{ref.subject}.robust_after.{ref.metric}", i)
        return None if v is None else (v, None)

    return fn


def radius_key(r: float) -> str:
    """``8/255`` style text for a radius (used as a display label, never for lookup)."""
    return format_radius(r)
