"""The audit: a teacher/student pair under an attack suite over radii, with confidence
intervals, transfer figures, optional certification and Proposition-2 terms, and gates.

Modules: ``api`` (:func:`audit`, :func:`run_audit`), ``evaluation`` (:func:`evaluate`: one model, RobustBench
style), ``config`` (:class:`AuditConfig`), ``plan`` (the
immutable plan: models, data, radii, gates, checked before any output), ``stages`` (clean predictions,
attacks, certification, Proposition 2, sanity checks), ``aggregate`` (the results records), ``store``
(the output directory and resume state), ``result`` (:class:`AuditResult`), ``gates`` (the gate
language) and ``judging`` (judging gates), ``stats`` (intervals), ``render`` (terminal tables).

Public names are imported lazily (``robkd.auditing.config`` and ``.gates`` need no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "audit": "robkd.auditing.api",
    "run_audit": "robkd.auditing.api",
    "evaluate": "robkd.auditing.evaluation",
    "EvaluationResult": "robkd.auditing.evaluation",
    "AuditConfig": "robkd.auditing.config",
    "read_spec": "robkd.auditing.config",
    "AuditResult": "robkd.auditing.result",
    "SCHEMA_VERSION": "robkd.auditing.result",
    "parse_gate": "robkd.auditing.gates",
    "judge": "robkd.auditing.judging",
    "GateResult": "robkd.auditing.gates",
    "clopper_pearson": "robkd.auditing.stats",
    "Proportion": "robkd.auditing.stats",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'robkd.auditing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
