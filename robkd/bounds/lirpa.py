"""Thin adapter to auto_LiRPA (used by ``--bounds-backend auto_lirpa`` when a working version is importable).

PyPI's auto_LiRPA 0.3 does not import on recent torch; the adapter then raises
a clear :class:`~robkd.errors.UsageError` instead of failing deep inside.
"""

from __future__ import annotations

import torch
from torch import nn

from robkd.errors import UsageError
from robkd.types import Norm

_METHODS = {"ibp": "IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}


def lirpa_bounds(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    *,
    norm: Norm = Norm.LINF,
    method: str = "crown",
    C: torch.Tensor | None = None,
    batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of ``C @ model(x')`` over the ball (Linf: intersected with [0,1]) computed by auto_LiRPA."""
    try:
        import numpy as np
        from auto_LiRPA import BoundedModule, BoundedTensor
        from auto_LiRPA.perturbations import PerturbationLpNorm
    except Exception as exc:  # noqa: BLE001
        raise UsageError(
            f"--bounds-backend auto_lirpa needs a working auto_LiRPA installation ({type(exc).__name__}: {exc}); "
            "use the default backend 'robkd'"
        ) from exc
    if method not in _METHODS:
        raise UsageError(f"unknown bound method {method!r}")
    bounded = BoundedModule(model, torch.zeros_like(x[:1]), device=str(x.device))
    lbs, ubs = [], []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s : s + batch_size]
        if Norm.parse(norm) is Norm.LINF:
            ptb = PerturbationLpNorm(norm=np.inf, eps=eps, x_L=(xb - eps).clamp(0, 1), x_U=(xb + eps).clamp(0, 1))
        else:
            ptb = PerturbationLpNorm(norm=2, eps=eps)
        Cb = None if C is None else (C if C.dim() == 3 and C.shape[0] == x.shape[0] else C.expand(x.shape[0], *C.shape[-2:]))[s : s + batch_size]
        lb, ub = bounded.compute_bounds(x=(BoundedTensor(xb, ptb),), C=Cb, method=_METHODS[method])
        lbs.append(lb.detach())
        ubs.append(ub.detach())
    return torch.cat(lbs), torch.cat(ubs)
