"""The robust-distillation methods after ARD/KDIGA: RSLAD, IAD, AdaAD, and IGDM as an add-on term.

Same conventions as :mod:`robkd.distill.objectives` (``objective(ctx, x, y, idx) -> (loss, terms)``):
every KL is ``batchmean`` (summed over the classes, averaged over the samples) with the *target* written
first, ``KL(P || Q) = mean_i sum_k P_ik (log P_ik - log Q_ik)``; teacher outputs are constants (detached).
The formulas, and where the papers' public code differs, are in ``docs/methods.md`` (section 3).

* RSLAD (Zi et al., ICCV 2021): ``alpha KL(T(x) || S(x_adv)) + (1 - alpha) KL(T(x) || S(x))``,
  alpha = 5/6; x_adv maximises ``KL(T(x) || S(x + d))`` from ``x + 0.001 N(0, I)``. No CE, no temperature.
* IAD (Zhu et al., ICLR 2022; IAD-I, built on ARD): ARD's loss, plus, from pass
  ``round(iad_warmup * passes)`` on, ``alpha mean_i (1 - w_i) KL(S(x_i) || S(x_adv,i))`` with
  ``w_i = p_T(y_i | x_adv,i)^iad_beta`` (detached). The KL target ``S(x)`` is not detached (as in the code).
* AdaAD (Huang et al., CVPR 2023): ``alpha KL(T(x_adv) || S(x_adv)) + (1 - alpha) KL(T(x) || S(x))``,
  alpha = 1; x_adv maximises ``KL(T(x + d) || S(x + d))`` (the teacher is queried at every step).
* IGDM (Lee et al., ICLR 2024), with ``igdm=True`` on ard/rslad/adaad: ``+ lambda_igdm * (k / K) *
  KL(softmax(T(x + d) - T(x - d)) || softmax(S(x + d) - S(x - d)))``, ``d = x_adv - x`` of the base
  method's attack, ``k`` the 1-based optimizer step and ``K`` the steps of the run (the paper ramps per
  epoch over 200 epochs; per step, a one-epoch fine-tune does not start at the full weight); ``x - d`` is not clipped.
"""

from __future__ import annotations

import math

import torch

from robkd.distill import losses as L
from robkd.distill import objectives as O
from robkd.distill.objectives import Objective, StepContext
from robkd.errors import UsageError


def igdm_weight(ctx: StepContext) -> float:
    """IGDM's coefficient at the current optimizer step: ``lambda_igdm * (k + 1) / K`` at step ``k`` of the run's ``K``
    (``ctx.progress``): the paper's linear ramp, per step rather than per epoch so that a short run (a one-epoch
    fine-tune) starts near 0 as a long one does instead of at the full weight."""
    return float(ctx.config.lambda_igdm) * float(ctx.progress)


def igdm_term(ctx: StepContext, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(T(x+d) - T(x-d)) || softmax(S(x+d) - S(x-d)))`` (batchmean, unweighted), ``d = x_adv - x``."""
    d = (x_adv - x).detach()
    xp, xm = x + d, x - d
    with torch.no_grad():
        t_diff = ctx.teacher(xp) - ctx.teacher(xm)
    return L.kl_divergence(t_diff.detach(), ctx.student(xp) - ctx.student(xm))


def _with_igdm(ctx: StepContext, x, x_adv, loss, terms):
    """``loss`` plus the IGDM term when ``config.igdm`` (the term's weighted value goes into ``terms["igdm"]``)."""
    if not ctx.config.igdm:
        return loss, terms
    ig = igdm_weight(ctx) * igdm_term(ctx, x, x_adv)
    terms = {**terms, "igdm": ig.item()}
    return loss + ig, terms


def obj_ard_igdm(ctx: StepContext, x, y, idx):
    """ARD + IGDM."""
    loss, terms, x_adv, _ = O.ard_terms(ctx, x, y, idx)
    return _with_igdm(ctx, x, x_adv, loss, terms)


def obj_rslad(ctx: StepContext, x, y, idx):
    """RSLAD: alpha KL(T(x) || S(x_adv)) + (1 - alpha) KL(T(x) || S(x)); x_adv from :meth:`StepContext.pgd_rslad`."""
    c = ctx.config
    t = ctx.teacher_logits(x, idx).detach()
    x_adv = ctx.pgd_rslad(x, t)
    kl = c.alpha * L.kl_divergence(t, ctx.student(x_adv))
    loss, terms = kl, {"kl_adv": kl.item()}
    if c.alpha < 1:
        nat = (1 - c.alpha) * L.kl_divergence(t, ctx.student(x))
        loss = loss + nat
        terms["kl_nat"] = nat.item()
    return _with_igdm(ctx, x, x_adv, loss, terms)


def iad_active(ctx: StepContext) -> bool:
    """Whether IAD's introspection is on in the current pass: from pass ``round(iad_warmup * passes)`` (0-based) on."""
    start = int(math.floor(float(ctx.config.iad_warmup) * ctx.passes + 0.5))
    return ctx.epoch >= start


def obj_iad(ctx: StepContext, x, y, idx):
    """IAD-I: alpha tau^2 KL(T(x)/tau || S(x_adv)/tau) + (1 - alpha) CE(S(x), y)
    [+ alpha mean_i (1 - p_T(y_i | x_adv,i)^iad_beta) KL(S(x_i) || S(x_adv,i)) after the warm-up]."""
    c = ctx.config
    x_adv = ctx.pgd_ce(x, y)
    t = ctx.teacher_logits(x, idx)
    s_adv = ctx.student(x_adv)
    kl = c.alpha * L.distillation_kl(s_adv, t, c.temperature)
    loss, terms = kl, {"kl_adv": kl.item()}
    active = iad_active(ctx)
    s_nat = ctx.student(x) if (c.alpha < 1 or active) else None
    if c.alpha < 1:
        ce = (1 - c.alpha) * L.cross_entropy(s_nat, y)
        loss = loss + ce
        terms["ce"] = ce.item()
    if active:
        with torch.no_grad():
            p_true = torch.softmax(ctx.teacher(x_adv), dim=1).gather(1, y[:, None]).squeeze(1)
            w = p_true.pow(float(c.iad_beta))
        intro = c.alpha * ((1 - w) * L.kl_divergence(s_nat, s_adv, reduction="none")).mean()
        loss = loss + intro
        terms["introspection"] = intro.item()
    return loss, terms


def obj_adaad(ctx: StepContext, x, y, idx):
    """AdaAD: alpha KL(T(x_adv) || S(x_adv)) + (1 - alpha) KL(T(x) || S(x)); x_adv from :meth:`StepContext.pgd_adaad`."""
    c = ctx.config
    x_adv = ctx.pgd_adaad(x)
    with torch.no_grad():
        t_adv = ctx.teacher(x_adv).detach()
    kl = c.alpha * L.kl_divergence(t_adv, ctx.student(x_adv))
    loss, terms = kl, {"kl_adv": kl.item()}
    if c.alpha < 1:
        nat = (1 - c.alpha) * L.kl_divergence(ctx.teacher_logits(x, idx).detach(), ctx.student(x))
        loss = loss + nat
        terms["kl_nat"] = nat.item()
    return _with_igdm(ctx, x, x_adv, loss, terms)


RECENT_OBJECTIVES: dict[str, Objective] = {"rslad": obj_rslad, "iad": obj_iad, "adaad": obj_adaad}


def objective_for(config) -> Objective:
    """The per-batch objective of a resolved config: the seed methods', the recent ones', ARD + IGDM with ``igdm``."""
    m = config.method
    if m == "ard" and getattr(config, "igdm", False):
        return obj_ard_igdm
    if m in RECENT_OBJECTIVES:
        return RECENT_OBJECTIVES[m]
    if m in O.OBJECTIVES:
        return O.OBJECTIVES[m]
    raise UsageError(f"no per-batch objective for method {m!r}; known: {', '.join([*O.OBJECTIVES, *RECENT_OBJECTIVES])}")
