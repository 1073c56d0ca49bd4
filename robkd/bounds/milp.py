"""Exact verification of small ReLU networks by mixed-integer linear programming (scipy / HiGHS).

Encoding (per sample, Linf ball intersected with [0,1]): input variables ``x``
in the clipped box; every affine operator (Linear, Conv2d, BatchNorm,
Normalize, pooling, reshapes, residual adds) is unrolled into an exact affine
expression over the variables; every ReLU whose pre-activation bounds (from
CROWN, or IBP) straddle zero gets a continuous output ``y`` in [0, u] and a
binary ``a`` with the big-M constraints

    y >= z,   y <= z - l (1 - a),   y <= u a,

while stable ReLUs are encoded without binaries (identity or zero). For each
class ``j != y`` whose CROWN margin bound is not already positive, the MILP
minimises ``logit_y - logit_j``; a negative optimum yields a counterexample,
which is re-checked by a forward pass before the sample is called falsified.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from robkd.bounds import ops
from robkd.bounds.checks import batch_input_shape, in_eval_mode
from robkd.bounds.compute import margin_matrix
from robkd.bounds.graph import BoundedModel
from robkd.errors import UnsupportedModelError, UsageError
from robkd.types import Norm
from robkd.utils.logits import predict

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MilpOutcome:
    """Exact verdict for one sample: ``verified`` / ``falsified`` (with a re-checked counterexample) / ``unknown``.

    ``min_margins`` maps each class ``j`` whose MILP was solved to optimality
    to the exact minimum of ``logit_y - logit_j`` over the ball; ``bound_margins``
    holds the CROWN lower bounds used to skip classes.
    """

    index: int
    status: str
    label: int
    min_margins: dict[int, float]
    bound_margins: dict[int, float]
    counterexample: torch.Tensor | None = None
    reason: str = ""
    seconds: float = 0.0
    unstable: int = 0
    dual_margins: dict[int, float] = dataclasses.field(default_factory=dict)  # solver's proven lower bounds

    def margin_lower_bounds(self) -> list[float]:
        """Per class ``j != label`` (increasing ``j``): a sound lower bound of ``logit_label - logit_j`` over the
        ball: the minimum where solved to optimality, else the larger of the CROWN bound and the solver's dual bound."""
        out = []
        for j in sorted(self.bound_margins):
            if j in self.min_margins:  # the optimum, or the dual bound when the solver's gap leaves it lower
                out.append(min(self.min_margins[j], self.dual_margins.get(j, float("inf"))))
            else:
                out.append(max(self.bound_margins[j], self.dual_margins.get(j, float("-inf"))))
        return out

    @property
    def min_margin(self) -> float | None:
        """The exact minimum margin over all classes, when every class was solved exactly."""
        if len(self.min_margins) != len(self.bound_margins) or not self.min_margins:
            return None
        return min(self.min_margins.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "status": self.status,
            "label": self.label,
            "min_margins": {str(k): v for k, v in self.min_margins.items()},
            "bound_margins": {str(k): v for k, v in self.bound_margins.items()},
            "has_counterexample": self.counterexample is not None,
            "reason": self.reason,
            "seconds": self.seconds,
            "unstable_relus": self.unstable,
        }


class _Encoding:
    """Variables ``[x (n0), y (U), a (U)]``, big-M rows ``G v <= h`` and the affine logit expressions."""

    def __init__(self, bm: BoundedModel, x: torch.Tensor, eps: float, nb: dict[str, ops.Bounds]) -> None:
        n0 = x.numel()
        dt = torch.float64
        unstable = {}
        for name in bm.relu_inputs:
            lo, hi = nb[name]
            unstable[name] = ((lo[0] < 0) & (hi[0] > 0)).flatten()
        U = int(sum(int(m.sum()) for m in unstable.values()))
        V = n0 + U
        self.n0, self.U, self.V = n0, U, V
        xl = (x.flatten().double() - eps).clamp(0, 1)
        xu = (x.flatten().double() + eps).clamp(0, 1)
        lb = [xl, torch.zeros(2 * U, dtype=dt)]
        ub = [xu, torch.zeros(U, dtype=dt), torch.ones(U, dtype=dt)]
        rows: list[torch.Tensor] = []
        rhs: list[torch.Tensor] = []
        expr: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
            bm.input_name: (torch.cat([torch.eye(n0, dtype=dt), torch.zeros(n0, U, dtype=dt)], 1), torch.zeros(n0, dtype=dt))
        }
        next_var = n0
        y_upper = []
        for op in bm.ops:
            if isinstance(op, ops.ReLU):
                M, c = expr[op.inputs[0]]
                lo, hi = (t[0].flatten().double() for t in nb[op.inputs[0]])
                active = lo >= 0
                unst = unstable[op.inputs[0]]
                M_out = torch.where(active.unsqueeze(1), M, torch.zeros_like(M))
                c_out = torch.where(active, c, torch.zeros_like(c))
                for i in unst.nonzero().flatten().tolist():
                    k = next_var
                    next_var += 1
                    kk = k - n0  # index among y / a
                    # widen the float32 bounds slightly so the big-M constraints never cut off a true point
                    l, u = float(lo[i]) - 1e-5 * (1 + abs(float(lo[i]))), float(hi[i]) + 1e-5 * (1 + abs(float(hi[i])))
                    M_out[i] = 0.0
                    M_out[i, k] = 1.0
                    c_out[i] = 0.0
                    y_upper.append(u)
                    zrow = torch.cat([M[i], torch.zeros(U, dtype=dt)])
                    # z - y <= -c
                    r1 = zrow.clone()
                    r1[k] -= 1.0
                    rows.append(r1)
                    rhs.append(-c[i])
                    # y - z - l a <= c - l   (y <= z - l (1 - a))
                    r2 = -zrow
                    r2[k] += 1.0
                    r2[V + kk] = -l
                    rows.append(r2)
                    rhs.append(c[i] - l)
                    # y - u a <= 0
                    r3 = torch.zeros(V + U, dtype=dt)
                    r3[k] = 1.0
                    r3[V + kk] = -u
                    rows.append(r3)
                    rhs.append(torch.tensor(0.0, dtype=dt))
                expr[op.name] = (M_out, c_out)
            elif isinstance(op, ops.Add):
                (Ma, ca), (Mb, cb) = expr[op.inputs[0]], expr[op.inputs[1]]
                expr[op.name] = (Ma + op.sign * Mb, ca + op.sign * cb)
            elif op.is_linear and hasattr(op, "linear_part"):
                M, c = expr[op.inputs[0]]
                in_shape = bm_shape(bm, op.inputs[0])
                cols = M.t().reshape((V,) + in_shape)
                M_out = op.linear_part(cols).reshape(V, -1).t().contiguous()
                c_out = (op.linear_part(c.reshape((1,) + in_shape)) + op.constant().to(dt)).flatten()
                expr[op.name] = (M_out, c_out)
            else:
                raise UnsupportedModelError(f"MILP encoding does not support {type(op).__name__} at {op.name}",
                                            unsupported=[f"{type(op).__name__} at {op.name}"])
        ub[1] = torch.tensor(y_upper, dtype=dt)
        self.lb = torch.cat(lb).numpy()
        self.ub = torch.cat(ub).numpy()
        self.G = torch.stack(rows).numpy() if rows else np.zeros((0, V + U))
        self.h = torch.stack([torch.as_tensor(r, dtype=dt) for r in rhs]).numpy() if rhs else np.zeros(0)
        self.integrality = np.concatenate([np.zeros(V), np.ones(U)])
        self.out = expr[bm.output_name]

    def minimise(self, coef: torch.Tensor, time_limit: float) -> tuple[str, float | None, float | None, np.ndarray | None]:
        """Minimise ``coef @ logits``: (status, optimum or best value, dual bound, x) with status optimal/limit/failed."""
        from scipy.optimize import Bounds, LinearConstraint, milp

        M, c = self.out
        obj = (coef.double() @ M).numpy()
        const = float(coef.double() @ c)
        cost = np.concatenate([obj, np.zeros(self.U)])
        constraints = [LinearConstraint(self.G, -np.inf, self.h)] if self.G.shape[0] else []
        res = milp(cost, integrality=self.integrality, bounds=Bounds(self.lb, self.ub), constraints=constraints,
                   options={"time_limit": max(0.01, float(time_limit)), "disp": False})
        x = None if res.x is None else np.asarray(res.x[: self.n0])
        best = None if res.fun is None else float(res.fun) + const
        dual = getattr(res, "mip_dual_bound", None)
        dual = None if dual is None or not math.isfinite(float(dual)) else float(dual) + const
        if res.status == 0:
            return "optimal", best, best if dual is None else dual, x
        if res.status == 1:
            return "limit", best, dual, x
        return "failed", best, dual, x


def bm_shape(bm: BoundedModel, name: str) -> tuple[int, ...]:
    if name == bm.input_name:
        return bm.input_shape
    return bm.ops[bm.index[name]].out_shape


@in_eval_mode
def verify_milp(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    time_limit: float = 30.0,
    norm: "Norm | str" = Norm.LINF,
    bounds_method: str = "crown",
    exhaustive: bool = False,
) -> list[MilpOutcome]:
    """Exact robustness verdicts at radius ``eps`` (Linf) for each sample, within ``time_limit`` seconds each.

    ``exhaustive=True`` solves every class ``j`` exactly (even those the CROWN
    bound already verifies), so ``min_margin`` is always the exact minimum. The model runs in eval
    mode (every module's mode restored afterwards), so BatchNorm uses its running statistics.
    """
    norm = Norm.parse(norm)
    if norm is not Norm.LINF:
        raise UsageError("MILP verification supports the Linf ball only")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise UsageError(f"eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(time_limit, (int, float)) or not time_limit > 0:
        raise UsageError(f"time_limit must be > 0 seconds, got {time_limit!r}")
    shape = batch_input_shape(x)
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
        raise UsageError("y must be a (B,) label tensor matching x")
    bm = BoundedModel(model, shape)
    bm.check(bounds_method)
    if bm.no_backward:
        bm.check("crown")
    outcomes: list[MilpOutcome] = []
    for i in range(x.shape[0]):
        t0 = time.perf_counter()
        xi = x[i : i + 1].detach().float()
        yi = int(y[i])
        with torch.no_grad():
            logits = model(xi)
        K = logits.shape[1]
        if not 0 <= yi < K:
            raise UsageError(f"label {yi} out of range 0..{K - 1}")
        others = [j for j in range(K) if j != yi]
        C = margin_matrix(torch.tensor([yi]), K)
        with torch.no_grad():
            lb, _, nb = bm.bounds(xi, float(eps), norm=norm, method=bounds_method, C=C)
        bound = {j: float(lb[0, k]) for k, j in enumerate(others)}
        out = MilpOutcome(i, "unknown", yi, {}, bound)
        if int(predict(logits)) != yi:
            out.status, out.counterexample, out.reason = "falsified", xi[0].clone(), (
                "misclassified at the centre" if bool(torch.isfinite(logits).all()) else "non-finite output at the centre")
            if not exhaustive:
                out.seconds = time.perf_counter() - t0
                outcomes.append(out)
                continue
        enc = _Encoding(bm, xi, float(eps), nb)
        out.unstable = enc.U
        verified_all = True
        for j in sorted(others, key=lambda j: bound[j]):
            if bound[j] > 0 and not exhaustive:
                continue
            left = time_limit - (time.perf_counter() - t0)
            if left <= 0:
                verified_all = False
                out.reason = "time limit"
                break
            coef = C[0, others.index(j)]
            status, best, dual, xs = enc.minimise(coef, left)
            if status == "optimal" and best is not None:
                out.min_margins[j] = best
            if dual is not None:
                out.dual_margins[j] = dual
            if dual is not None and dual > 0:
                continue  # class j verified exactly (or by the solver's dual bound)
            verified_all = False
            if best is not None and best < 0 and xs is not None and out.status != "falsified":
                cand = torch.as_tensor(xs, dtype=torch.float32).reshape(xi.shape)
                cand = torch.min(torch.max(cand, xi - eps), xi + eps).clamp(0, 1)
                with torch.no_grad():
                    pred = int(predict(model(cand)))
                if pred != yi:
                    out.status, out.counterexample = "falsified", cand[0]
                    out.reason = f"counterexample classified as {pred} (margin to {j}: {best:.4g})"
                    if not exhaustive:
                        break
                else:
                    out.reason = "MILP optimum below 0 not confirmed by the forward pass (tolerance)"
            elif status != "optimal":
                out.reason = "time limit" if status == "limit" else "solver failure"
        if verified_all and out.status != "falsified":
            out.status, out.reason = "verified", ""
        out.seconds = time.perf_counter() - t0
        outcomes.append(out)
    return outcomes
