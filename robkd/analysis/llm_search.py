"""APGD-style ascent (Croce & Hein, ICML 2020) for the local-linearity maximisation.

The local-linearity estimate (:mod:`robkd.analysis.llm`) maximises a per-sample
objective over the ``norm``-ball of radius ``eps`` around ``x`` intersected with
the [0,1] box. A fixed-step sign ascent from one random start stalls far below
the maximum on small networks; this module implements the Auto-PGD schedule for
that maximisation:

* first step ``eta = 2 * eps``; each later step moves to
  ``x_{k+1} = P(x_k + a (z_k - x_k) + (1 - a)(x_k - x_{k-1}))`` with
  ``z_k = P(x_k + eta * d(g_k))`` (momentum ``a = 0.75``; ``d`` = sign for Linf,
  ``g/||g||_2`` for L2);
* at the checkpoints ``w_j = ceil(p_j N)`` (``p_0 = 0``, ``p_1 = 0.22``,
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``) the step size of a sample
  is halved and its iterate reset to its best point when fewer than 75% of the
  steps since the last checkpoint increased its objective, or when neither its
  step size nor its best value changed since then;
* every evaluated point that is feasible counts as a candidate (the estimate is
  the best value seen, from below).

All decisions are per sample, so a sample's path does not depend on the other
samples in its batch.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from robkd.attacks._geometry import ascent_direction, per_sample, project

__all__ = ["apgd_checkpoints", "apgd_ascent"]

#: momentum and the "enough steps improved" fraction of Croce & Hein (2020)
MOMENTUM, RHO = 0.75, 0.75


def apgd_checkpoints(steps: int) -> list[int]:
    """The APGD checkpoint iterations ``ceil(p_j * steps)`` (strictly increasing, each in [1, steps])."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    out: list[int] = []
    for v in p[1:]:
        w = min(int(math.ceil(v * steps)), steps)
        if w >= 1 and (not out or w > out[-1]):
            out.append(w)
    return out


def apgd_ascent(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    start: torch.Tensor,
    *,
    norm,
    eps: float,
    steps: int,
    first_step: "float | None" = None,
) -> torch.Tensor:
    """Run ``steps`` APGD iterations maximising ``fn`` (per-sample ``(B,)``, differentiable) from ``start``.

    ``fn`` is called on every iterate (``steps + 1`` forward+backward passes); the
    caller records candidate values inside ``fn`` (see
    :class:`robkd.analysis.llm.BestTracker`). ``first_step``: the initial step size
    (default ``2 * eps``). Returns the best iterate per sample.
    """
    eps_t = per_sample(eps, x)
    bshape = eps_t.shape

    def value_and_grad(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            f = fn(z)
            (g,) = torch.autograd.grad(f.sum(), z)
        return f.detach(), torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)

    z = start.detach().clone()
    f, g = value_and_grad(z)
    f = torch.nan_to_num(f, nan=-math.inf)
    best_x, best_f, best_g = z.clone(), f.clone(), g.clone()
    if steps <= 0:
        return best_x
    eta = (2.0 * eps_t if first_step is None else torch.full_like(eps_t, float(first_step))).clone()
    prev = z.clone()
    checkpoints = set(apgd_checkpoints(steps))
    last_cp, improved = 0, torch.zeros_like(f)
    eta_at_cp, best_at_cp = eta.clone(), best_f.clone()
    f_prev = f.clone()
    for k in range(steps):
        step = project(z + eta * ascent_direction(g, norm), x, norm, eps_t)
        if k > 0:
            step = project(z + MOMENTUM * (step - z) + (1.0 - MOMENTUM) * (z - prev), x, norm, eps_t)
        prev, z = z, step
        f, g = value_and_grad(z)
        f = torch.nan_to_num(f, nan=-math.inf)
        improved += (f > f_prev).to(f.dtype)
        f_prev = f
        better = f > best_f
        if bool(better.any()):
            best_f = torch.where(better, f, best_f)
            m = better.view(bshape)
            best_x = torch.where(m, z, best_x)
            best_g = torch.where(m, g, best_g)
        if k + 1 in checkpoints and k + 1 < steps:
            span = k + 1 - last_cp
            cond1 = improved < RHO * span
            cond2 = (eta.flatten() == eta_at_cp.flatten()) & (best_f == best_at_cp)
            halve = (cond1 | cond2).view(bshape)
            eta = torch.where(halve, eta / 2.0, eta)
            z = torch.where(halve, best_x, z)
            g = torch.where(halve, best_g, g)
            prev = torch.where(halve, best_x, prev)
            f_prev = torch.where(halve.flatten(), best_f, f_prev)
            last_cp, improved = k + 1, torch.zeros_like(f)
            eta_at_cp, best_at_cp = eta.clone(), best_f.clone()
    return best_x
