"""Proposition 2 of the KDIGA paper: its per-sample terms, and the measured left-hand side.

For every ``e`` in the ``d``-ball (robkd: the ball intersected with the [0,1] box)::

    |CE_s(x+e) - CE_t(x+e)| <= LLM_s + LLM_t + CE_s(x) + CE_t(x) + d * ||g_s - g_t||_*

with ``g = grad_x CE(f(x), y)`` per sample and ``||.||_*`` the DUAL norm of the
threat model's norm (L1 for an Linf ball, L2 for an L2 ball). The proof: write
each loss as its first-order Taylor expansion plus a remainder bounded by the
LLM; Hoelder gives ``|e . (g_s - g_t)| <= d ||g_s - g_t||_*``; and
``|CE_s(x) - CE_t(x)| <= CE_s(x) + CE_t(x)`` since CE >= 0.

The paper's Table 4 prints ``||g_s - g_t||_2`` at Linf radii; with an Linf ball
that is *not* a valid bound (it is smaller than the L1 norm by up to sqrt(D)).
robkd reports the valid dual-norm bound as ``bound`` and the paper's L2 figure
beside it as ``grad_diff_l2`` / ``bound_paper_l2``, labelled.

The LLM terms are estimates from below (see :mod:`robkd.analysis.llm`), so the
computed ``bound`` can itself be too low. robkd therefore also *measures* the
left-hand side, attacking ``|CE_s(x+e) - CE_t(x+e)|`` directly, and reports
each sample where the measured LHS exceeds the computed bound (``violated``):
a violation means the LLM estimate was too low, not that the proposition fails.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from robkd.analysis.llm import (
    ESTIMATE_NOTE,
    BestTracker,
    ascent,
    check_step_size,
    check_eps,
    check_inputs,
    check_model,
    input_gradient,
    local_linearity,
    per_sample_ce,
    summarize,
)
from robkd.errors import UsageError
from robkd.utils.modules import eval_mode
from robkd.utils.validate import check_int
from robkd.types import Norm

log = logging.getLogger(__name__)

__all__ = ["Prop2Result", "prop2_terms", "dual_norm"]

TENSOR_FIELDS = (
    "llm_s",
    "llm_t",
    "ce_s",
    "ce_t",
    "grad_diff_dual",
    "grad_diff_l2",
    "bound",
    "bound_paper_l2",
    "lhs_max",
    "violated",
)


def dual_norm(v: torch.Tensor, norm: "Norm | str") -> torch.Tensor:
    """Per-sample dual norm ``(B,)`` of ``v`` (B, ...): L1 for an Linf ball, L2 for an L2 ball."""
    norm = Norm.parse(norm)
    return torch.linalg.vector_norm(v.flatten(1), ord=norm.dual, dim=1)


@dataclasses.dataclass
class Prop2Result:
    """Per-sample Proposition-2 terms at one radius, and the measured left-hand side.

    Tensors are ``(N,)``: ``llm_s``/``llm_t`` (LLM estimates from below),
    ``ce_s``/``ce_t`` (clean CE), ``grad_diff_dual`` (``||g_s - g_t||`` in the dual
    norm of ``norm``: L1 for Linf, L2 for L2), ``grad_diff_l2`` (the L2 figure the
    paper prints), ``bound`` (the valid right-hand side),
    ``bound_paper_l2`` (the same with the L2 figure; a valid bound only for L2
    balls), ``lhs_max`` (largest ``|CE_s(x+e) - CE_t(x+e)|`` found by attack),
    ``violated`` (bool: ``lhs_max`` exceeds ``bound`` beyond float tolerance,
    i.e. an LLM estimate was too low).
    """

    eps: float
    norm: Norm
    llm_s: torch.Tensor
    llm_t: torch.Tensor
    ce_s: torch.Tensor
    ce_t: torch.Tensor
    grad_diff_dual: torch.Tensor
    grad_diff_l2: torch.Tensor
    bound: torch.Tensor
    bound_paper_l2: torch.Tensor
    lhs_max: torch.Tensor
    violated: torch.Tensor
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def dual_norm_name(self) -> str:
        """``"L1"`` for an Linf ball, ``"L2"`` for an L2 ball."""
        return "L1" if self.norm is Norm.LINF else "L2"

    @property
    def note(self) -> str:
        """The caveats every report of these numbers must carry."""
        text = (
            f"{ESTIMATE_NOTE} The valid bound uses the dual norm of the {self.norm.value} threat model "
            f"({self.dual_norm_name} norm of the per-sample input-gradient difference)."
        )
        if self.norm is Norm.LINF:
            text += (
                " 'grad_diff_l2'/'bound_paper_l2' reproduce the L2 figure printed in the KDIGA paper's "
                "Table 4; for an Linf ball that is not a valid bound."
            )
        text += (
            " 'lhs_max' is the largest |CE_s(x+e) - CE_t(x+e)| found by attack (also from below); a "
            "violation (lhs_max > bound) means an LLM estimate was too low."
        )
        return text

    def __len__(self) -> int:
        return int(self.bound.shape[0])

    def summary(self) -> dict[str, Any]:
        """Means/medians of every term, the violation count and rate, and the note (JSON-safe)."""
        out: dict[str, Any] = {
            "eps": self.eps,
            "norm": self.norm.value,
            "dual_norm": self.dual_norm_name,
            "n": len(self),
            "llm_estimate": "lower",
        }
        for name in TENSOR_FIELDS:
            if name == "violated":
                continue
            s = summarize(getattr(self, name))
            out[name] = {"mean": s["mean"], "median": s["median"]}
        n_viol = int(self.violated.sum())
        out["violations"] = n_viol
        out["violation_rate"] = n_viol / len(self) if len(self) else float("nan")
        out["note"] = self.note
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: settings, summary, and per-sample lists of every term."""
        per_sample: dict[str, list[Any]] = {}
        for name in TENSOR_FIELDS:
            t = getattr(self, name).detach().cpu()
            per_sample[name] = [bool(v) for v in t.tolist()] if name == "violated" else [float(v) for v in t.tolist()]
        return {
            "eps": self.eps,
            "norm": self.norm.value,
            "dual_norm": self.dual_norm_name,
            "settings": dict(self.settings),
            "summary": self.summary(),
            "per_sample": per_sample,
        }


def _check_llm_override(value: Any, n: int, like: torch.Tensor, name: str) -> "torch.Tensor | None":
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        t = torch.full((n,), float(value), dtype=like.dtype, device=like.device)
    elif isinstance(value, torch.Tensor):
        t = value.detach().to(dtype=like.dtype, device=like.device)
        if t.dim() == 0:
            t = t.expand(n).clone()
    else:
        raise UsageError(f"{name} must be a number or a tensor of shape ({n},)")
    if t.shape != (n,) or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise UsageError(f"{name} must be finite, >= 0, of shape ({n},)")
    return t


def measure_lhs(
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: Norm,
    steps: int,
    restarts: int,
    step_size: "float | None" = None,
    generator: "torch.Generator | None" = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Largest ``|CE_s(x+e) - CE_t(x+e)|`` found over the ball ∩ [0,1] (``(N,)``, from below).

    Starts: ``e = 0`` (its value is recorded), ascent on ``CE_s - CE_t`` and on
    ``CE_t - CE_s`` from ``x`` (both signs), then ``restarts`` ascents on the
    absolute difference from uniform random starts. Every iterate is a candidate.
    """
    alpha = check_step_size(step_size, eps, steps)
    gen = generator or torch.Generator().manual_seed(0)
    out = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], batch_size):
        xb, yb = x[s : s + batch_size], y[s : s + batch_size]
        with torch.no_grad():
            d0 = (per_sample_ce(student, xb, yb) - per_sample_ce(teacher, xb, yb)).abs()
        if eps == 0.0:
            out[s : s + xb.shape[0]] = d0
            continue
        sign_holder = {"sign": 1.0}

        def objective(z: torch.Tensor, yb=yb) -> tuple[torch.Tensor, torch.Tensor]:
            diff = per_sample_ce(student, z, yb) - per_sample_ce(teacher, z, yb)
            sgn = sign_holder["sign"]
            obj = diff.abs() if sgn == 0.0 else sgn * diff
            return obj, diff.detach().abs()

        tracker = BestTracker(objective, xb, norm, eps, d0)
        runs: list[tuple[float, "str | None"]] = [(1.0, None), (-1.0, None)] + [(0.0, "uniform")] * restarts
        for sgn, start in runs:
            sign_holder["sign"] = sgn
            ascent(tracker, xb, norm=norm, eps=eps, steps=steps, step_size=alpha,
                    random_start=start, generator=gen)
        out[s : s + xb.shape[0]] = tracker.best
    return out


def prop2_terms(
    teacher: nn.Module,
    student: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: "Norm | str" = Norm.LINF,
    steps: int = 20,
    restarts: int = 1,
    seed: int = 0,
    step_size: "float | None" = None,
    lhs_steps: "int | None" = None,
    lhs_restarts: "int | None" = None,
    llm_s: "torch.Tensor | float | None" = None,
    llm_t: "torch.Tensor | float | None" = None,
    tol: float = 1e-5,
    batch_size: int = 256,
) -> Prop2Result:
    """Per-sample Proposition-2 terms at radius ``eps`` and the measured left-hand side.

    ``steps``/``restarts``/``step_size`` configure the LLM estimates (see
    :func:`robkd.analysis.llm.local_linearity`); ``lhs_steps``/``lhs_restarts``
    the direct attack on ``|CE_s - CE_t|`` (default: the same values).
    ``llm_s``/``llm_t`` replace the estimates by given values (precomputed, or
    hand-set to probe the violation report). A sample is ``violated`` when
    ``lhs_max > bound + tol * (1 + bound)``. Both models run in eval mode;
    only input gradients are taken.
    """
    teacher = check_model(teacher, "teacher")
    student = check_model(student, "student")
    norm = Norm.parse(norm)
    eps = check_eps(eps)
    steps = check_int(steps, "steps", 0)
    restarts = check_int(restarts, "restarts", 1)
    lhs_steps = steps if lhs_steps is None else check_int(lhs_steps, "lhs_steps", 0)
    lhs_restarts = restarts if lhs_restarts is None else check_int(lhs_restarts, "lhs_restarts", 0)
    batch_size = check_int(batch_size, "batch_size", 1)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol >= 0):
        raise UsageError(f"tol must be a number >= 0, got {tol!r}")
    check_step_size(step_size, eps, steps)
    x, y = check_inputs(x, y)
    n = x.shape[0]
    llm_s_t = _check_llm_override(llm_s, n, x, "llm_s")
    llm_t_t = _check_llm_override(llm_t, n, x, "llm_t")

    with eval_mode(teacher, student):
        ce_s_l, ce_t_l, dual_l, l2_l = [], [], [], []
        for s in range(0, n, batch_size):
            xb, yb = x[s : s + batch_size], y[s : s + batch_size]
            ce_s_b, g_s = input_gradient(student, xb, yb)
            ce_t_b, g_t = input_gradient(teacher, xb, yb)
            diff = g_s - g_t
            ce_s_l.append(ce_s_b)
            ce_t_l.append(ce_t_b)
            dual_l.append(dual_norm(diff, norm))
            l2_l.append(dual_norm(diff, Norm.L2))
        ce_s, ce_t = torch.cat(ce_s_l), torch.cat(ce_t_l)
        grad_diff_dual, grad_diff_l2 = torch.cat(dual_l), torch.cat(l2_l)

        kw = dict(norm=norm, steps=steps, restarts=restarts, step_size=step_size, seed=seed, batch_size=batch_size)
        if llm_s_t is None:
            llm_s_t = local_linearity(student, x, y, eps, **kw)
        if llm_t_t is None:
            llm_t_t = local_linearity(teacher, x, y, eps, **kw)

        gen = torch.Generator(device=x.device if x.device.type != "cpu" else "cpu").manual_seed(int(seed) + 1)
        lhs = measure_lhs(student, teacher, x, y, eps, norm=norm, steps=lhs_steps, restarts=lhs_restarts,
                          step_size=step_size, generator=gen, batch_size=batch_size)

    bound = llm_s_t + llm_t_t + ce_s + ce_t + eps * grad_diff_dual
    bound_l2 = llm_s_t + llm_t_t + ce_s + ce_t + eps * grad_diff_l2
    violated = lhs > bound + tol * (1.0 + bound)
    if bool(violated.any()):
        log.warning(
            "Proposition 2 at eps=%g: measured LHS exceeds the estimated bound on %d/%d samples "
            "(the LLM estimate was too low there; use more steps/restarts)",
            eps, int(violated.sum()), n,
        )
    settings = {
        "steps": steps,
        "restarts": restarts,
        "step_size": step_size,
        "lhs_steps": lhs_steps,
        "lhs_restarts": lhs_restarts,
        "seed": seed,
        "tol": float(tol),
        "llm_s_given": llm_s is not None,
        "llm_t_given": llm_t is not None,
        "domain": "ball intersected with the [0,1] image box",
    }
    return Prop2Result(
        eps=eps, norm=norm, llm_s=llm_s_t, llm_t=llm_t_t, ce_s=ce_s, ce_t=ce_t,
        grad_diff_dual=grad_diff_dual, grad_diff_l2=grad_diff_l2, bound=bound,
        bound_paper_l2=bound_l2, lhs_max=lhs, violated=violated, settings=settings,
    )
