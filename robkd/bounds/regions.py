"""Linear regions: is the network affine on a ball, the exact margin there, and the largest such radius.

Proposition 1 of the KDIGA paper assumes one: if no ReLU's pre-activation bounds over the ball
straddle zero (and every max-pooling window is decided), the network is affine on the ball. CROWN's
backward pass is then the exact affine map, and for the Linf ball intersected with [0,1] the minimum
margin is attained at a box corner and computed in closed form, so robustness is *decided*
(certified or falsified), not merely bounded. :func:`linear_region_radius` finds, per sample, the
largest radius for which the bounds show this, by bisection.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from robkd.bounds import ops
from robkd.bounds.checks import batch_input_shape, check_batch_size, in_eval_mode
from robkd.bounds.graph import METHODS, BoundedModel
from robkd.bounds.inputset import InputSet, concretize
from robkd.errors import UsageError
from robkd.types import Norm


def count_unstable(bm: BoundedModel, nb: dict[str, ops.Bounds], B: int) -> torch.Tensor:
    """``(B,)`` number of unstable ReLUs (pre-activation bounds straddling zero) under the node bounds ``nb``."""
    unst = torch.zeros(B, dtype=torch.long, device=next(iter(nb.values()))[0].device)
    for name in bm.relu_inputs:
        lo, hi = nb[name]
        unst += ((lo < 0) & (hi > 0)).reshape(B, -1).sum(1)
    return unst


def pieces_decided(bm: BoundedModel, nb: dict[str, ops.Bounds], B: int) -> torch.Tensor:
    """``(B,)`` bool: every piecewise-linear operator other than ReLU (max pooling) is decided on the set
    the node bounds ``nb`` enclose (always True for graphs without one; False for unknown kinds)."""
    ok = torch.ones(B, dtype=torch.bool, device=next(iter(nb.values()))[0].device)
    for op in bm.piecewise_ops:
        if isinstance(op, ops.MaxPool2d):
            ok &= op.decided(nb[op.inputs[0]]).to(ok.device)
        else:
            ok &= False
    return ok


def affine_margin(
    bm: BoundedModel, x: torch.Tensor, eps: float, norm: Norm, C: torch.Tensor, nb: dict[str, ops.Bounds]
) -> torch.Tensor:
    """Minimum of ``C @ f`` over the ball when ``f`` is affine there (all ReLUs stable, max-pooling windows
    decided): the backward pass is then the exact affine map, minimised in closed form at a box corner."""
    inputs = InputSet.around(x, float(eps), norm)
    spec = C.reshape(C.shape[0], C.shape[1], *bm.ops[bm.index[bm.output_name]].out_shape)
    A, bias = bm.backward(bm.output_name, spec, nb)
    return concretize(A, bias, inputs)


@in_eval_mode
def affine_map(
    model: nn.Module, x: torch.Tensor, eps: float = 0.0, *, norm: "Norm | str" = Norm.LINF
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Jacobian and offset ``(J (B, K, n), c (B, K))`` of the network on the ball around ``x``,
    valid where the ball lies in one linear region (checked: raises UsageError otherwise)."""
    norm = Norm.parse(norm)
    bm = BoundedModel(model, batch_input_shape(x))
    bm.check("crown")
    with torch.no_grad():
        _, _, nb = bm.bounds(x, eps, norm=norm, method="crown")
        for name in bm.relu_inputs:
            lo, hi = nb[name]
            if bool(((lo < 0) & (hi > 0)).any()):
                raise UsageError("the ball is not inside one linear region (some ReLU is unstable)")
        out_shape = bm.ops[bm.index[bm.output_name]].out_shape
        K = math.prod(out_shape)
        spec = torch.eye(K, device=x.device, dtype=bm.dtype).reshape((1, K) + out_shape)
        A, bias = bm.backward(bm.output_name, spec, nb)
    B = x.shape[0]
    if A is None:
        return torch.zeros(B, K, x[0].numel()), bias.expand(B, K)
    return A.reshape(A.shape[0], K, -1).expand(B, K, -1), bias.expand(B, K)


def default_radius_cap(norm: "Norm | str", n_inputs: int) -> float:
    """Default upper end of the linear-region bisection: the smallest radius whose ball contains the whole
    input cube [0,1]^n from any centre in it (Linf: 1; L2: sqrt(n), the cube's diameter)."""
    norm = Norm.parse(norm)
    if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs <= 0:
        raise UsageError(f"n_inputs must be a positive integer, got {n_inputs!r}")
    return 1.0 if norm is Norm.LINF else math.sqrt(n_inputs)


def default_radius_tol(hi: float) -> float:
    """Default bisection tolerance: ``1e-4 * hi`` (about 14 bisection steps)."""
    return 1e-4 * float(hi)


@in_eval_mode
def linear_region_radius(
    model: nn.Module,
    x: torch.Tensor,
    *,
    norm: "Norm | str" = Norm.LINF,
    hi: float | None = None,
    tol: float | None = None,
    method: str = "crown",
    batch_size: int = 128,
) -> torch.Tensor:
    """Per sample, the largest radius (up to ``tol``, at most ``hi``) for which the bounds show the ball in
    one linear region (every ReLU stable, every max-pooling window decided), found by bisection.

    ``hi`` defaults to :func:`default_radius_cap` (Linf 1, L2 ``sqrt(n_inputs)``: the ball then covers
    the whole input cube), ``tol`` to ``1e-4 * hi``. A sample whose radius equals ``hi`` hit the cap.
    Each returned radius ``r`` is verified (sound: the bounds at ``r`` show no unstable piece, or
    ``r = 0``); below the cap the bounds at some radius ``<= r + tol`` show an unstable piece. The model
    runs in eval mode (restored afterwards).
    """
    norm = Norm.parse(norm)
    shape = batch_input_shape(x)
    if hi is None:
        hi = default_radius_cap(norm, math.prod(shape))
    if isinstance(hi, bool) or not (isinstance(hi, (int, float)) and math.isfinite(hi) and hi > 0):
        raise UsageError(f"hi must be a finite number > 0, got {hi!r}")
    if tol is None:
        tol = default_radius_tol(hi)
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and 0 < tol < hi):
        raise UsageError(f"tol must be in (0, hi), got {tol!r}")
    check_batch_size(batch_size)
    if method not in METHODS:
        raise UsageError(f"unknown bound method {method!r}: use one of {', '.join(METHODS)}")
    bm = BoundedModel(model, shape)
    bm.check(method)
    use_crown = method != "ibp"

    def linear_at(xb: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        nb = bm.intermediate_bounds(InputSet.around(xb, e, norm), use_crown)
        return (count_unstable(bm, nb, xb.shape[0]) == 0) & pieces_decided(bm, nb, xb.shape[0])

    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size].to(bm.dtype)
            n = xb.shape[0]
            lo = torch.zeros(n, device=xb.device)
            up = torch.full((n,), float(hi), device=xb.device)
            at_hi = linear_at(xb, up)
            lo = torch.where(at_hi, up, lo)
            active = ~at_hi
            while bool(active.any()) and float((up - lo)[active].max()) > tol:
                mid = (lo + up) / 2
                ok = linear_at(xb, mid)
                lo = torch.where(active & ok, mid, lo)
                up = torch.where(active & ~ok, mid, up)
            out.append(lo)
    return torch.cat(out).cpu()


def linear_region_radius_summary(
    radii: torch.Tensor, *, hi: float, tol: float, norm: "Norm | str", method: str, per_sample: bool = True,
) -> dict[str, Any]:
    """JSON-ready figures of :func:`linear_region_radius` results: ``mean``, ``median``, ``min``, ``max``,
    the bisection settings, ``capped`` (samples whose radius hit ``hi``) and their positions
    ``capped_samples``; with ``per_sample`` also the list ``per_sample``."""
    if not isinstance(radii, torch.Tensor) or radii.dim() != 1:
        raise UsageError(f"radii must be a 1-D tensor, got {getattr(radii, 'shape', type(radii))}")
    r = radii.detach().double().cpu()
    capped = r >= float(torch.tensor(float(hi), dtype=torch.float32))
    n = int(r.numel())
    out: dict[str, Any] = {
        "norm": Norm.parse(norm).value,
        "method": method,
        "hi": float(hi),
        "tol": float(tol),
        "n": n,
        "mean": float(r.mean()) if n else None,
        "median": float(r.median()) if n else None,
        "min": float(r.min()) if n else None,
        "max": float(r.max()) if n else None,
        "capped": int(capped.sum()),
        "capped_samples": capped.nonzero().flatten().tolist(),
    }
    if per_sample:
        out["per_sample"] = [float(v) for v in r.tolist()]
    return out
