"""Aggregation: the whole-set outcomes of the stages as ``results.json`` records and per-sample tensors.

Every function returns the records it builds and the ``samples.safetensors`` tensors behind them
(names as in docs/results-schema.md), so that each figure can be recounted from the tensors.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

import torch

from robkd.auditing.plan import ROLES, AuditPlan
from robkd.auditing.result import SCHEMA_VERSION
from robkd.auditing.stages import CertificationUnsupported, ModelOutcome, NonFiniteCounts, Prop2Outcome
from robkd.auditing.stats import CONFIDENCE, Proportion, ratio_interval
from robkd.auditing.verdict import default_verdict
from robkd.types import format_radius

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


def _count(mask: torch.Tensor) -> int:
    return int(mask.sum().item())


def results(plan: AuditPlan, outcomes: Mapping[str, ModelOutcome], non_finite: Mapping[str, NonFiniteCounts],
            prop2: Prop2Outcome | None, flags: list[dict[str, Any]] | None, timings: dict[str, Any], *,
            command: Sequence[str] | None, distributed: dict[str, Any] | None) -> tuple[dict[str, Any], Tensors]:
    """The results dict (gates not yet judged: ``gates`` empty, ``gates_passed`` true; the default verdict
    judged) and its tensors.

    ``timings`` is stored as given (the caller adds ``total_s`` once the gates are judged); ``distributed``
    is the ``distributed`` record of a torchrun job (None: a single process)."""
    cfg = plan.cfg
    tensors: Tensors = {
        "indices": plan.indices.clone(),
        "labels": plan.y.cpu().clone(),
        "radii": torch.tensor(plan.radii, dtype=torch.float64),
    }
    blocks: dict[str, dict[str, Any]] = {}
    resumed: list[str] = []
    for role in ROLES:
        o = outcomes[role]
        resumed += [f"{role}:{a}@{format_radius(r)}" for (a, r) in sorted(o.resumed, key=lambda t: (t[1], t[0]))]
        block, t = model_block(plan, o, non_finite[role].adv_pred)
        tensors.update(t)
        block["non_finite"] = non_finite[role].to_dict()
        if o.certification is not None:
            block["certification"], t = certification_block(plan, o, t[f"{role}.robust"], block["per_radius"])
            tensors.update(t)
        block["timings"] = o.timings.to_dict()
        blocks[role] = block
    transfer_records, t = transfer(plan, outcomes)
    tensors.update(t)
    prop2_record = None
    if prop2 is not None:
        prop2_record = {"steps": prop2.steps, "per_radius": [
            {"radius": r, "radius_text": format_radius(r), "summary": s} for r, s in zip(plan.radii, prop2.summaries)]}
        tensors.update({f"prop2.{f}": v for f, v in prop2.tensors.items()})
    data: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "robkd-audit",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": list(command) if command is not None else None,
        "config": cfg.to_dict(),
        "norm": plan.norm.value,
        "radii": list(plan.radii),
        "radii_text": [format_radius(r) for r in plan.radii],
        "attacks": list(cfg.attacks),
        "cascade_order": list(plan.suite.order),
        "confidence": CONFIDENCE,
        "data": dict(plan.data_info),
        "teacher": blocks["teacher"],
        "student": blocks["student"],
        "transfer": transfer_records,
        "prop2": prop2_record,
        "sanity": {"strict": cfg.strict, "checked": flags is not None, "attack_checks_n": cfg.sanity_n if flags is not None else 0,
                   "flags": flags or []},
        "gates": [],
        "gates_passed": True,
        "default_verdict": None,
        "environment": environment(),
        "resumed": resumed,
        "timings": timings,
    }
    if distributed is not None:
        data["distributed"] = distributed
    data["default_verdict"] = default_verdict(data, tensors, on=cfg.gate_on, seed=cfg.seed, enforced=cfg.enforce_default_verdict)
    return data, tensors


def model_block(plan: AuditPlan, outcome: ModelOutcome, adv_pred: torch.Tensor) -> tuple[dict[str, Any], Tensors]:
    """The ``teacher``/``student`` record (clean and per-radius accuracy with intervals, who broke what) and
    the per-sample tensors ``<role>.*``; ``certification`` is left None. ``adv_pred``: the predictions on the
    kept adversarial examples (:attr:`robkd.auditing.stages.NonFiniteCounts.adv_pred`, one forward pass)."""
    role, sres = outcome.role, outcome.suite
    y = plan.y.cpu()
    n = int(y.shape[0])
    clean_correct = outcome.clean_pred == y
    suite_clean = sres.clean_correct.cpu().bool()
    if not torch.equal(suite_clean, clean_correct):
        log.warning("%s: %d samples changed their clean prediction between passes (non-deterministic model?)",
                    role, _count(suite_clean != clean_correct))
    robust = sres.robust.cpu().bool()
    broken_by = sres.broken_by.cpu().long()
    robust_after = sres.robust_after
    per_radius = []
    for i, r in enumerate(plan.radii):
        after = {a: Proportion.of(_count(robust_after[a][i].cpu().bool()), n).to_dict() for a in sres.order}
        per_radius.append({
            "radius": r,
            "radius_text": format_radius(r),
            "worst": Proportion.of(_count(robust[i]), n).to_dict(),
            "after_attack": after,
            "broken_by": {a: _count(broken_by[i] == j) for j, a in enumerate(plan.cfg.attacks)},
            "misclassified_clean": _count(broken_by[i] == -2),
        })
    tensors: Tensors = {
        f"{role}.clean_pred": outcome.clean_pred.long(),
        f"{role}.clean_correct": suite_clean,
        f"{role}.broken_by": broken_by,
        f"{role}.robust": robust,
    }
    for a in sres.order:
        tensors[f"{role}.robust_after.{a}"] = robust_after[a].cpu().bool()
    tensors[f"{role}.x_adv"] = sres.x_adv.detach().cpu().float()  # spilled: stays in its file (robkd.utils.spill)
    tensors[f"{role}.adv_radius"] = sres.adv_radius.detach().cpu().double()
    tensors[f"{role}.adv_pred"] = adv_pred.cpu().long().clone()  # a copy: an identical model's is shared
    block = {
        "model": dict(plan.model_info[role]),
        "clean": Proportion.of(_count(clean_correct), n).to_dict(),
        "per_radius": per_radius,
        "per_class": per_class(y, clean_correct, robust),
        "rejected_adversarials": dict(sres.rejected),
        "certification": None,
    }
    return block, tensors


def per_class(y: torch.Tensor, clean_correct: torch.Tensor, robust: torch.Tensor) -> dict[str, Any]:
    """The ``<role>.per_class`` record: for each label present among the audited samples (ascending,
    ``classes``), its sample count ``n``, clean-correct count and robust count per radius (``robust[i][c]``)."""
    y = y.cpu().long()
    classes = torch.unique(y)
    member = y[None, :] == classes[:, None]  # (C, N)

    def counts(mask: torch.Tensor) -> list[int]:
        return [int(v) for v in (member & mask.cpu().bool()[None, :]).sum(dim=1).tolist()]

    return {"classes": [int(c) for c in classes.tolist()], "n": [int(v) for v in member.sum(dim=1).tolist()],
            "clean_correct": counts(clean_correct), "robust": [counts(robust[i]) for i in range(robust.shape[0])]}


def certification_block(plan: AuditPlan, outcome: ModelOutcome, robust: torch.Tensor,
                        per_radius: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], Tensors]:
    """The ``<role>.certification`` record (certified accuracy beside the empirical one per radius) and its
    tensors; ``robust`` is the model's ``(R, N)`` empirical robustness, ``per_radius`` its model block's."""
    cert = outcome.certification
    if isinstance(cert, CertificationUnsupported):
        return cert.to_dict(), {}
    if cert is None:
        raise ValueError(f"no certification outcome for the {outcome.role}")
    role = outcome.role
    method = plan.cfg.certify
    n = plan.n
    cert_rows, unstable_rows, region_rows, records = [], [], [], []
    for i, r in enumerate(plan.radii):
        rc = cert[i]
        c, u, lr = rc.certified.bool(), rc.unstable.long(), rc.linear_region.bool()
        cert_rows.append(c)
        unstable_rows.append(u)
        region_rows.append(lr)
        cp = Proportion.of(_count(c), n)
        worst = per_radius[i]["worst"]
        records.append({
            "radius": r,
            "radius_text": format_radius(r),
            "certified": cp.to_dict(),
            "empirical": worst,
            "band": [cp.value, worst["value"]],
            "certified_but_broken": _count(c & ~robust[i]),
            "falsified": _count(rc.status == 2),
            "unknown": _count(rc.status == 0),
            "linear_region_fraction": _count(lr) / n,
            "mean_unstable_relus": float(u.double().mean()),
            "total_relus": rc.total_relus,
        })
    tensors: Tensors = {
        f"{role}.certified": torch.stack(cert_rows),
        f"{role}.unstable_relus": torch.stack(unstable_rows),
        f"{role}.linear_region": torch.stack(region_rows),
    }
    block: dict[str, Any] = {"status": "ok", "method": method, "per_radius": records}
    if plan.cfg.linear_region_radius and cert and cert[0].linear_region_radius is not None:
        from robkd.bounds import default_radius_cap, default_radius_tol, linear_region_radius_summary

        lr_radius = cert[0].linear_region_radius.float()
        hi = default_radius_cap(plan.norm, int(plan.x[0].numel()))
        block["linear_region_radius"] = linear_region_radius_summary(
            lr_radius, hi=hi, tol=default_radius_tol(hi), norm=plan.norm, method=method, per_sample=False)
        tensors[f"{role}.linear_region_radius"] = lr_radius
    return block, tensors


def transfer(plan: AuditPlan, outcomes: Mapping[str, ModelOutcome]) -> tuple[list[dict[str, Any]], Tensors]:
    """Per radius: how much of the teacher's robustness the student kept (a ratio with its interval), lost
    and gained; tensors ``transfer.lost``/``transfer.gained``."""
    n = plan.n
    rt_all = outcomes["teacher"].suite.robust.cpu().bool()
    rs_all = outcomes["student"].suite.robust.cpu().bool()
    out = []
    for i, r in enumerate(plan.radii):
        rt, rs = rt_all[i], rs_all[i]
        t, s = Proportion.of(_count(rt), n), Proportion.of(_count(rs), n)
        point, lo, hi = ratio_interval(s, t)
        lost, gained = rt & ~rs, rs & ~rt
        out.append({
            "radius": r,
            "radius_text": format_radius(r),
            "teacher_robust": t.k,
            "student_robust": s.k,
            "both_robust": _count(rt & rs),
            "ratio": {"value": point, "ci_low": lo, "ci_high": hi, "confidence": CONFIDENCE,
                      "method": "Bonferroni box of two Clopper-Pearson intervals at 97.5%"},
            "lost": {**Proportion.of(_count(lost), n).to_dict(),
                     "of_teacher_robust": (_count(lost) / t.k) if t.k else None},
            "gained": {**Proportion.of(_count(gained), n).to_dict(),
                       "of_student_robust": (_count(gained) / s.k) if s.k else None},
        })
    return out, {"transfer.lost": rt_all & ~rs_all, "transfer.gained": rs_all & ~rt_all}


def environment() -> dict[str, Any]:
    """The environment record (:func:`robkd.utils.env.collect`); never fails an audit."""
    import sys

    try:
        from robkd.utils.env import collect

        return collect()
    except Exception as exc:  # noqa: BLE001 - the environment record must never break an audit
        return {"error": f"{type(exc).__name__}: {exc}", "python": sys.version.split()[0]}
