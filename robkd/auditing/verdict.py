"""Verdicts from a results dict: the default transfer verdict, and gates judged again without any model.

* :func:`default_verdict`: robustness kept (student / teacher worst-case robust accuracy) at the largest
  radius against :data:`DEFAULT_THRESHOLD`, judged like the gate
  ``student.worst@R >= 0.9*teacher.worst@R`` (same ``gate_on`` rule, same intervals or paired bootstrap).
  Every audit records it (``default_verdict``); it decides the exit code only when enforced.
* :func:`rejudge`: a copy of a results dict with new gates judged on its figures (``robkd gate``): the
  paired bootstrap where the per-sample outcomes (``samples.safetensors``) are at hand, else the
  conservative interval arithmetic.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Mapping, Sequence

from robkd.auditing.gates import Gate, parse_gate, validate_gate
from robkd.auditing.judging import GATE_MODES, SampleFn, judge
from robkd.auditing.result import AuditResult, gate_samples, lookup_metric
from robkd.errors import UsageError
from robkd.report.schema import Results
from robkd.types import format_radius

#: the share of the teacher's worst-case robust accuracy the student must keep (default verdict)
DEFAULT_THRESHOLD = 0.9


def default_expr(radius: float, threshold: float = DEFAULT_THRESHOLD) -> str:
    """The gate the default verdict is judged as, e.g. ``student.worst@8/255 >= 0.9*teacher.worst@8/255``."""
    r = format_radius(radius)
    return f"student.worst@{r} >= {threshold:g}*teacher.worst@{r}"


def _samples_for(gate: Gate, fn: SampleFn | None) -> SampleFn | None:
    """``fn`` when it has the per-sample outcomes of every metric of ``gate`` (else None: interval judgement)."""
    if fn is None or any(fn(r) is None for r in gate.refs()):
        return None
    return fn


def _sample_fn(data: dict[str, Any], tensors: Mapping[str, Any] | None) -> SampleFn | None:
    return gate_samples(data, tensors) if tensors else None


def _sample_size(data: dict[str, Any]) -> int | None:
    n = Results(data).section("data").get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def default_verdict(data: dict[str, Any], tensors: Mapping[str, Any] | None = None, *, on: str = "lower",
                    seed: int = 0, enforced: bool = False) -> dict[str, Any] | None:
    """The ``default_verdict`` record of a results dict (None when it audited no radius)."""
    res = Results(data)
    if not res.radii:
        return None
    i = len(res.radii) - 1
    radius = res.radii[i]
    gate = parse_gate(default_expr(radius))
    verdict = judge(gate, lambda ref: lookup_metric(data, ref), on=on, samples=_samples_for(gate, _sample_fn(data, tensors)),
                    seed=seed, sample_size=_sample_size(data))
    transfer = res.transfer
    kept = transfer[i].ratio.value if i < len(transfer) and transfer[i].ratio is not None else None
    if kept is None:  # results without a transfer ratio: from the worst-case accuracies
        t, s = res.teacher.row(i).worst.value, res.student.row(i).worst.value
        kept = s / t if t and s is not None else None
    return {"expr": gate.text, "radius": radius, "threshold": DEFAULT_THRESHOLD, "kept": kept, "passed": verdict.passed,
            "enforced": bool(enforced), "gate": verdict.to_dict()}


def check_gates(data: dict[str, Any], gates: Sequence[str]) -> list[Gate]:
    """Parse ``gates`` and check them against what the results measured (audited radii and attacks,
    certification); raises :class:`~robkd.auditing.gates.GateError` (exit 2)."""
    res = Results(data)
    certified = all((c := res.model(role).certification) is not None and c.ok for role in ("teacher", "student"))
    attacks = [str(a) for a in data.get("attacks") or []] or res.attacks
    parsed = [parse_gate(g) for g in gates]
    for g in parsed:
        validate_gate(g, radii=res.radii, attacks=attacks, certified=certified)
    return parsed


def rejudge(data: dict[str, Any], gates: Sequence[str] | None = None, tensors: Mapping[str, Any] | None = None, *,
            on: str | None = None, enforce_default: bool | None = None,
            command: Sequence[str] | None = None) -> AuditResult:
    """A copy of ``data`` with ``gates`` (default: the gates it recorded) judged on its figures, judged on
    ``on`` (default: its ``gate_on``), and its default verdict judged again (``enforce_default`` None keeps
    the recorded setting). ``gates``, ``gates_passed``, ``default_verdict``, ``exit_code``, ``config.gates``
    and ``config.gate_on`` are replaced; ``rejudged`` records ``command``. The bootstrap seed is the
    audit's, so gates judged again on the same per-sample outcomes get the audit's own verdict."""
    out = copy.deepcopy(data)
    config = out.get("config") if isinstance(out.get("config"), dict) else {}
    out["config"] = config
    if gates is None:
        recorded = config.get("gates")
        gates = [str(g) for g in recorded] if isinstance(recorded, list) else [str(g["gate"]) for g in Results(data).raw.get("gates") or []]
    on = on if on is not None else str(config.get("gate_on") or "lower")
    if on not in GATE_MODES:
        raise UsageError(f"unknown gate mode {on!r}: use 'lower' (confidence bounds) or 'point'")
    seed = config.get("seed")
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else 0
    if enforce_default is None:
        dv = Results(data).default_verdict
        enforce_default = bool(dv.enforced) if dv is not None else bool(config.get("enforce_default_verdict"))
    parsed = check_gates(data, gates)
    fn = _sample_fn(data, tensors)
    results = [judge(g, lambda ref: lookup_metric(data, ref), on=on, samples=_samples_for(g, fn), seed=seed,
                     sample_size=_sample_size(data)) for g in parsed]
    out["gates"] = [r.to_dict() for r in results]
    out["gates_passed"] = all(r.passed for r in results)
    out["default_verdict"] = default_verdict(data, tensors, on=on, seed=seed, enforced=enforce_default)
    config["gates"] = [g.text for g in parsed]
    config["gate_on"] = on
    if "enforce_default_verdict" in config:
        config["enforce_default_verdict"] = bool(enforce_default)
    out["rejudged"] = {"command": list(command) if command is not None else None,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    result = AuditResult(out, dict(tensors or {}), results)
    out["exit_code"] = result.exit_code
    return result
