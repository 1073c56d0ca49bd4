"""The outcome of an audit: a JSON-ready dict (``results.json``) plus per-sample tensors.

The layout of ``results.json`` is documented key by key in ``docs/results-schema.md`` and owned by
:mod:`robkd.report.schema` (constants, reader, validator, typed access, :class:`ResultsError`): this
module writes and reads through it, and the gates read their metrics through its typed view.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from robkd.auditing.gates import GateResult, Interval, Ref, parse_ref
from robkd.auditing.corruption_metrics import corruption_metric, corruption_samples
from robkd.errors import EXIT_GATE_FAILED, EXIT_OK, EXIT_SANITY, UsageError
from robkd.report.schema import (
    RESULTS_FILE,
    SAMPLES_FILE,
    SCHEMA_VERSION,
    Estimate,
    Results,
    ResultsError,
    find_radius,
    load_results,
    validate_results,
)
from robkd.types import format_radius

if TYPE_CHECKING:
    import pandas as pd
    import torch

__all__ = ["RESULTS_FILE", "SAMPLES_FILE", "SCHEMA_VERSION", "AuditResult", "gate_samples", "lookup_metric"]

#: per-sample tensors that are not a column of :meth:`AuditResult.to_pandas` as such
_NOT_COLUMNS = ("indices", "labels", "radii")
_GROUPS = ("teacher", "student", "transfer", "prop2")


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
    def results(self) -> Results:
        """The typed view of the result (:class:`robkd.report.schema.Results`)."""
        return Results(self._data)

    @property
    def radii(self) -> list[float]:
        """Audited radii, ascending."""
        return self.results.radii

    @property
    def gates_passed(self) -> bool:
        """True when every gate passed (also when there are no gates)."""
        return all(g.passed for g in self.results.gates)

    @property
    def sanity_flags(self) -> list[dict[str, Any]]:
        """Sanity flags raised on the evaluation (each a dict with code/message/suggestion/model, and
        ``handled_by`` when the audit's settings already answer the flag: it then does not fail ``strict``)."""
        return self.results.sanity_flags

    @property
    def exit_code(self) -> int:
        """0 all gates pass; 1 a gate failed (or the default verdict, when enforced); 3 sanity flags under
        ``strict`` (takes precedence)."""
        res = self.results
        if res.section("config").get("strict") and any(not f.get("handled_by") for f in res.sanity_flags):
            return EXIT_SANITY
        dv = res.default_verdict
        default_failed = dv is not None and dv.enforced and dv.passed is False
        return EXIT_OK if self.gates_passed and not default_failed else EXIT_GATE_FAILED

    def metric(self, name: str | Ref) -> Interval | None:
        """A metric by reference, e.g. ``metric("student.worst@8/255")`` -> :class:`Interval` (None if undefined)."""
        return lookup_metric(self._data, parse_ref(name) if isinstance(name, str) else name)

    def attach_before(self, before: "AuditResult | dict[str, Any]") -> None:
        """Make this a repair result: ``kind`` becomes ``robkd-repair`` and ``before`` holds the pre-repair audit."""
        b = before.to_dict() if isinstance(before, AuditResult) else json.loads(json.dumps(before, allow_nan=False))
        if b.get("kind") != "robkd-audit":
            raise UsageError(f"the before-repair result must be a robkd-audit result, got kind {b.get('kind')!r}")
        b.pop("before", None)
        self._data["kind"] = "robkd-repair"
        self._data["before"] = b

    def attach_auto(self, block: dict[str, Any]) -> None:
        """Record the trials of ``robkd repair --method auto`` (the ``auto`` block, plain JSON) in the result."""
        self._data["auto"] = json.loads(json.dumps(block, allow_nan=False))

    def to_pandas(self) -> "pd.DataFrame":
        """The per-sample outcomes as a DataFrame: one row per audited sample, in audit order.

        The index (``index``) is each sample's position in the dataset split; ``label`` its true label.
        Every other tensor of ``samples.safetensors`` with one value per sample is a column of that name
        (``student.clean_pred``, ``student.clean_correct``, ``student.adv_radius``, ...); one with one row
        per radius gives a column per radius, ``NAME@RADIUS`` with the radius as in ``radii_text``
        (``student.robust@8/255``, ``student.broken_by@8/255``, ``student.robust_after.fgsm@8/255``,
        ``transfer.lost@8/255``, ``prop2.bound@8/255``, ...). Columns come by model (teacher, student),
        then transfer and prop2, in name order; images (``x_adv``) are left out. Values keep the tensors'
        dtypes (``broken_by``: index into ``attacks``, -1 robust, -2 misclassified clean).
        Raises :class:`ResultsError` when the result holds no per-sample tensors.
        """
        import pandas as pd

        if "indices" not in self.tensors or "labels" not in self.tensors:
            raise ResultsError("this result holds no per-sample tensors: use the AuditResult an audit returned, or "
                               "AuditResult.load(DIR) of a directory with samples.safetensors")
        index = _numpy(self.tensors["indices"])
        n = len(index)
        labels = [format_radius(r) for r in self.radii]
        columns: dict[str, Any] = {"label": _numpy(self.tensors["labels"])}

        def order(name: str) -> tuple[int, str]:
            group = name.split(".", 1)[0]
            return (_GROUPS.index(group) if group in _GROUPS else len(_GROUPS), name)

        for name in sorted((k for k in self.tensors if k not in _NOT_COLUMNS), key=order):
            values = _numpy(self.tensors[name])
            if values.shape == (n,):
                columns[name] = values
            elif values.shape == (len(labels), n):
                columns.update({f"{name}@{label}": values[j] for j, label in enumerate(labels)})
        return pd.DataFrame(columns, index=pd.Index(index, name="index"))

    # ------------------------------------------------------------------ writing / reading
    def write(self, out_dir: str | Path, *, samples: bool = True) -> Path:
        """Write ``results.json`` and (``samples``) ``samples.safetensors`` into ``out_dir`` atomically; returns the
        json path. The result is first checked against the results schema (:class:`ResultsError` names the first
        bad key; nothing is written then), so every file written here is one the readers accept."""
        from robkd.utils.io import atomic_write_json

        validate_results(self._data, "the result to write")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if samples and self.tensors:
            from robkd.utils.spill import write_safetensors

            # streamed: a spilled tensor (x_adv) goes from its file to this one chunk by chunk
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
            write_safetensors(out / SAMPLES_FILE, tensors, metadata={"schema_version": SCHEMA_VERSION})
        atomic_write_json(out / RESULTS_FILE, self._data)
        return out / RESULTS_FILE

    @classmethod
    def load(cls, out_dir: str | Path, *, tensors: bool = True) -> "AuditResult":
        """Read an audit directory (or its results.json) written by :meth:`write`.

        The file goes through the one guarded reader of results files (:func:`robkd.report.schema.load_results`):
        missing, unreadable, non-strict or too deeply nested JSON, another schema version, or a file that breaks
        the schema raise :class:`~robkd.report.schema.ResultsError` (a :class:`UsageError`) with one line."""
        out = Path(out_dir)
        path = out / RESULTS_FILE if out.is_dir() else out
        data = load_results(path)
        t: dict[str, Any] = {}
        samples = path.parent / SAMPLES_FILE
        if tensors and samples.is_file():
            from safetensors.torch import load_file

            try:
                t = load_file(str(samples))
            except Exception as exc:  # safetensors raises its own error type on a corrupt file
                raise ResultsError(f"cannot read {samples}: {type(exc).__name__}: {exc}") from exc
        return cls(data, t)


def _numpy(t: Any) -> Any:
    return t.detach().cpu().numpy()


def _interval(e: Estimate) -> Interval | None:
    if e.value is None:
        return None
    return Interval(e.value, -math.inf if e.low is None else e.low, math.inf if e.high is None else e.high)


def lookup_metric(data: dict[str, Any], ref: Ref) -> Interval | None:
    """Resolve a gate reference against a results dict (None when undefined or absent)."""
    if ref.metric == "corruption":
        return corruption_metric(data, ref)
    res = Results(data)
    if ref.subject != "transfer" and ref.metric == "clean":
        return _interval(res.model(ref.subject).clean)
    i = find_radius(res.radii, ref.radius)
    if i is None:
        return None
    if ref.subject == "transfer":
        rows = res.transfer
        return _interval(rows[i].metric(ref.metric)) if i < len(rows) else None
    model = res.model(ref.subject)
    if ref.metric == "worst":
        return _interval(model.row(i).worst)
    if ref.metric == "certified":
        cert = model.certification
        return _interval(cert.row(i).certified) if cert is not None and cert.ok else None
    return _interval(model.row(i).after_attack.get(ref.metric, Estimate()))


def gate_samples(data: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Callable[[Ref], tuple[Any, Any] | None]:
    """Per-sample outcomes of every gate metric (for the paired judgement), from an audit's tensors.

    Returns ``fn(ref) -> (numerator, denominator | None)`` as numpy arrays over the audited samples
    (None when the metric is undefined): indicator vectors for accuracies and transfer lost/gained,
    student/teacher robust indicators for ``transfer.ratio``."""
    radii = Results(data).radii

    def vec(key: str, i: int | None = None) -> Any:
        t = tensors.get(key)
        if t is None:
            return None
        t = t if i is None else t[i]
        return t.detach().cpu().double().numpy()

    def fn(ref: Ref) -> tuple[Any, Any] | None:
        if ref.metric == "corruption":
            return corruption_samples(data, tensors, ref)
        if ref.subject != "transfer" and ref.metric == "clean":
            v = vec(f"{ref.subject}.clean_correct")
            return None if v is None else (v, None)
        i = find_radius(radii, ref.radius)
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
