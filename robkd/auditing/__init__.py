"""The audit: a teacher/student pair under an attack suite over radii, with confidence
intervals, transfer figures, optional certification and Proposition-2 terms, and gates.

Public names are imported lazily (``robkd.auditing.config`` and ``.gates`` need no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "audit": "robkd.auditing.core",
    "run_audit": "robkd.auditing.core",
    "weights_sha256": "robkd.auditing.core",
    "AuditConfig": "robkd.auditing.config",
    "read_spec": "robkd.auditing.config",
    "AuditResult": "robkd.auditing.result",
    "SCHEMA_VERSION": "robkd.auditing.result",
    "parse_gate": "robkd.auditing.gates",
    "judge": "robkd.auditing.gates",
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
