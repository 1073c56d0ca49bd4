"""Bound propagation and exact verification: IBP, CROWN, alpha-CROWN over a ``torch.fx`` trace,
linear-region checks, MILP (scipy/HiGHS) and randomized smoothing.

Where things live: ``trace`` (torch.fx -> bound operators), ``ops`` / ``windows`` (one bound operator
per op family; windowed CROWN for convolutions), ``inputset`` (the ball, the box, concretization),
``graph`` (:class:`BoundedModel`: IBP / CROWN / alpha-CROWN propagation), ``compute``
(:func:`compute_bounds`, :func:`margin_matrix`), ``certification`` (:func:`certify`,
:func:`certify_radii`), ``budget`` (``--budget``: per sample the tightest method that fits a time and memory
cap), ``records`` (the certify.json result entry of every method), ``regions`` (linear regions: exact margins, :func:`affine_map`,
:func:`linear_region_radius`), ``milp``, ``smoothing``, ``lirpa`` (optional auto_LiRPA backend),
``checks`` (argument checks shared by the entry points).

Public API:

* :func:`compute_bounds` (``model, x, eps, *, norm, method, C``) -> ``(lb, ub)``
* :func:`certify` -> :class:`CertifyResult` (certified accuracy, unstable ReLUs, linear regions)
* :func:`certify_radii` -> one :class:`CertifyResult` per radius (largest first, certified samples inherited)
* :func:`linear_region_radius` -> per-sample largest radius inside one linear region (bisection up to
  :func:`default_radius_cap`, tolerance :func:`default_radius_tol`); :func:`linear_region_radius_summary` -> its
  JSON figures
* :func:`robkd.bounds.milp.verify_milp` -> exact verdicts for small networks
* :func:`certify_smoothing` (``robkd.bounds.smoothing``) -> randomized smoothing
"""

from __future__ import annotations

import importlib
from typing import Any

from robkd.bounds.certification import BACKENDS, CertifyResult, certify, certify_radii
from robkd.bounds.compute import compute_bounds, margin_matrix
from robkd.bounds.graph import METHODS, BoundedModel
from robkd.bounds.regions import (
    affine_map,
    default_radius_cap,
    default_radius_tol,
    linear_region_radius,
    linear_region_radius_summary,
)

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
    "default_radius_tol",
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
