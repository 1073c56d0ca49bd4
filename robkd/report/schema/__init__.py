"""The results schema (version "1", docs/results-schema.md): one reader, one validator, typed access, one error.

Every user of ``results.json`` goes through this package: the writer (``AuditResult.write`` validates what
it writes), the API (``AuditResult.load``), the gates (``lookup_metric`` / ``gate_samples`` read figures
through :class:`Results`) and the report (which reads every value through :class:`Results`).

* :mod:`~robkd.report.schema.validation`: the constants of the layout, :class:`ResultsError`,
  :func:`load_results` (the guarded reader), :func:`validate_results` and :func:`check_schema`;
* :mod:`~robkd.report.schema.access`: :class:`Results` and its blocks, lenient typed views of a results dict.

It lives in ``robkd.report``, the lowest layer among its users (auditing and cli sit above it), beside the
escaping its error lines need, and imports neither torch nor pandas (``robkd report`` needs neither).
"""

from __future__ import annotations

from robkd.report.schema.access import (
    CertRow,
    Certification,
    DefaultVerdict,
    Estimate,
    GateVerdict,
    ModelBlock,
    PerClass,
    Prop2Row,
    RadiusRow,
    Results,
    TrainingLog,
    TransferRow,
    find_radius,
    number,
)
from robkd.report.schema.validation import (
    KINDS,
    NORMS,
    RESULTS_FILE,
    ROLES,
    SAMPLES_FILE,
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    ResultsError,
    check_schema,
    load_results,
    validate_results,
)

__all__ = [
    "KINDS", "NORMS", "RESULTS_FILE", "ROLES", "SAMPLES_FILE", "SCHEMA_VERSION", "SUPPORTED_SCHEMA_VERSIONS",
    "CertRow", "Certification", "DefaultVerdict", "Estimate", "GateVerdict", "ModelBlock", "PerClass", "Prop2Row", "RadiusRow", "Results",
    "ResultsError", "TrainingLog", "TransferRow", "check_schema", "find_radius", "load_results", "number",
    "validate_results",
]
