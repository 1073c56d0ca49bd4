"""Bound propagation and exact verification: IBP, CROWN, alpha-CROWN over a ``torch.fx`` trace,
linear-region checks, MILP (scipy/HiGHS) and randomized smoothing.

Public API:

* :func:`compute_bounds` (``model, x, eps, *, norm, method, C``) -> ``(lb, ub)``
* :func:`certify` -> :class:`CertifyResult` (certified accuracy, unstable ReLUs, linear regions)
* :func:`certify_radii` -> one :class:`CertifyResult` per radius (largest first, certified samples inherited)
* :func:`linear_region_radius` -> per-sample largest radius inside one linear region (bisection up to
  :func:`default_radius_cap`); :func:`linear_region_radius_summary` -> its JSON figures
* :func:`robkd.bounds.milp.verify_milp` -> exact verdicts for small networks
* :func:`certify_smoothing` (``robkd.bounds.smoothing``) -> randomized smoothing
"""

from __future__ import annotations

import importlib
from typing import Any

from robkd.bounds.api import (
    BACKENDS,
    CertifyResult,
    affine_map,
    certify,
    certify_radii,
    compute_bounds,
    default_radius_cap,
    linear_region_radius,
    linear_region_radius_summary,
    margin_matrix,
)
from robkd.bounds.graph import METHODS, BoundedModel

__all__ = [
    "BACKENDS",
    "METHODS",
    "BoundedModel",
    "CertifyResult",
    "affine_map",
    "certify",
    "certify_radii",
    "certify_smoothing",
    "compute_bounds",
    "default_radius_cap",
    "linear_region_radius",
    "linear_region_radius_summary",
    "margin_matrix",
    "verify_milp",
]


def __getattr__(name: str) -> Any:
    if name == "verify_milp":
        return importlib.import_module("robkd.bounds.milp").verify_milp
    if name == "certify_smoothing":
        return importlib.import_module("robkd.bounds.smoothing").certify_smoothing
    raise AttributeError(f"module 'robkd.bounds' has no attribute {name!r}")
