"""Optional whole-set analyses of an audit beside the attacks: the attack self-test and the common corruptions.

* :func:`self_test` (``--self-test``): the binarization test (:func:`robkd.analysis.selftest.attack_self_test`)
  of every gradient attack of the suite (Square, a black-box attack, is left out) at the largest radius on the
  first ``self_test_n`` audited samples, per model: ``<role>.self_test``. A model whose classification head is
  not its last ``nn.Linear`` gets ``{"status": "not_applicable", "reason": ...}``. A rate below the threshold
  raises the sanity flag ``attack-self-test-failed`` (fails under ``--strict``).
* :func:`corruptions` (``--corruptions``): accuracy of both models on the same corrupted images (each image
  corrupted once, both models classify it; per-sample seeds from the dataset index), per corruption and
  severity with Clopper-Pearson intervals; the mean over the corruptions per severity and over everything,
  with an interval for a mean of per-sample scores (see :func:`mean_interval`); the student/teacher ratios:
  ``<role>.corruption``, ``corruption_transfer``, tensors ``<role>.corruption_correct`` (``(C, S, N)`` bool).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from robkd.auditing.plan import ROLES, AuditPlan
from robkd.auditing.stages import EventFn
from robkd.auditing.stats import CONFIDENCE, Proportion
from robkd.errors import UsageError

log = logging.getLogger(__name__)

SELF_TEST_FLAG = "attack-self-test-failed"


# ----------------------------------------------------------------------------- the attack self-test
def self_test_attacks(plan: AuditPlan) -> list[str]:
    """The suite's gradient attacks (its own suite, without Square)."""
    from robkd.analysis.sanity_checks import BLACK_BOX

    return [a for a in plan.suite.attacks if a not in BLACK_BOX]


def self_test(plan: AuditPlan, event: EventFn) -> dict[str, dict[str, Any]]:
    """Per role, the ``<role>.self_test`` record."""
    from robkd.analysis.selftest import attack_self_test

    attacks = self_test_attacks(plan)
    eps = max(plan.radii)
    out: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        if not attacks:
            out[role] = {"status": "not_applicable", "reason": "the suite has no gradient attack to test"}
            continue
        event("start", {"model": role, "stage": "attack self-test", "radius": eps, "total": len(attacks)})
        t0 = time.perf_counter()
        try:
            res = attack_self_test(plan.models[role], plan.x, plan.y, attacks, plan.norm, eps,
                                   n=min(plan.cfg.self_test_n, plan.n), seed=plan.cfg.seed,
                                   attack_options={"batch_size": plan.cfg.batch_size})
        except UsageError as exc:  # no final nn.Linear head to binarise
            log.info("attack self-test of the %s not applicable: %s", role, exc)
            out[role] = {"status": "not_applicable", "reason": str(exc)}
        else:
            out[role] = {"status": "ok", **res.to_dict(), "seconds": time.perf_counter() - t0}
        event("advance", {"model": role, "n": len(attacks)})
        event("done", {"model": role})
    return out


def self_test_flags(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``attack-self-test-failed`` flag per model and attack whose self-test rate is below the threshold."""
    flags = []
    for role in ROLES:
        rec = records.get(role) or {}
        if rec.get("status") != "ok":
            continue
        for attack in rec.get("flagged", []):
            a = rec["attacks"][attack]
            flags.append({
                "code": SELF_TEST_FLAG,
                "message": (f"{attack} found the adversarial example known to exist (binarization test) on only "
                            f"{a['found']} of {a['valid']} samples of the {role} at radius {rec['eps']:g} "
                            f"(threshold {rec['threshold']:.0%})"),
                "suggestion": ("the attack cannot find adversarial examples that exist on this model: gradient "
                               "masking or a misconfigured attack; its robust accuracy is an overestimate (use "
                               "more steps, restarts, another loss, or AutoAttack)"),
                "model": role,
                "value": float(a["rate"]),
            })
    return flags


# ----------------------------------------------------------------------------- corruptions
def corruption_names(plan: AuditPlan) -> list[str]:
    """The corruptions the audit evaluates (``all``: the 15 of Hendrycks and Dietterich)."""
    from robkd.analysis.corruptions import CORRUPTIONS, check_name

    names = plan.cfg.corruptions or []
    return list(CORRUPTIONS) if names == ["all"] else [check_name(c) for c in names]


def mean_interval(scores: torch.Tensor, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The mean of per-sample scores in [0, 1] with a Clopper-Pearson interval at the fractional count
    ``k = sum(scores)`` of ``n`` (beta quantiles): exact for 0/1 scores; for scores in between, the binomial is
    the largest-variance distribution on [0, 1] with that mean, so the interval is wide enough for the
    usual (normal-approximation) cases, though not exact."""
    from scipy.stats import beta

    n = int(scores.numel())
    k = float(scores.double().sum())
    tail = (1.0 - confidence) / 2
    lo = 0.0 if k <= 0 else float(beta.ppf(tail, k, n - k + 1))
    hi = 1.0 if k >= n else float(beta.ppf(1 - tail, k + 1, n - k))
    return {"value": k / n, "n": n, "ci_low": lo, "ci_high": hi, "confidence": confidence}


def corruptions(plan: AuditPlan, event: EventFn) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, torch.Tensor]]:
    """``(records per role, corruption_transfer record, tensors)`` of the corruption evaluation."""
    from robkd.analysis.corruptions import corrupt, frost_source, resolve_profile
    from robkd.utils.modules import eval_mode

    names, sevs = corruption_names(plan), [int(s) for s in plan.cfg.severities]
    n, bs, seed = plan.n, plan.cfg.batch_size, plan.cfg.seed
    ids = plan.indices.cpu()
    correct = {role: torch.zeros(len(names), len(sevs), n, dtype=torch.bool) for role in ROLES}
    clean = {role: torch.zeros(n, dtype=torch.bool) for role in ROLES}
    t0 = time.perf_counter()
    event("start", {"model": "both", "stage": f"corruptions ({len(names)} x {len(sevs)} severities)", "total": n})
    models = plan.models
    with eval_mode(models["teacher"]), eval_mode(models["student"]), torch.no_grad():
        for s0 in range(0, n, bs):
            sl = slice(s0, min(s0 + bs, n))
            xb, yb = plan.x[sl], plan.y[sl]
            for role in ROLES:
                clean[role][sl] = (models[role](xb).argmax(1) == yb).cpu()
            xcpu = xb.detach().cpu()
            for ci, name in enumerate(names):
                for si, sev in enumerate(sevs):
                    xc = corrupt(xcpu, name, sev, seed=seed, ids=ids[sl]).to(plan.device, plan.x.dtype)
                    for role in ROLES:
                        correct[role][ci, si, sl] = (models[role](xc).argmax(1) == yb).cpu()
            event("advance", {"model": "both", "n": sl.stop - sl.start})
    event("done", {"model": "both"})
    seconds = time.perf_counter() - t0
    profile = resolve_profile(plan.x.shape[-2], plan.x.shape[-1], "auto")
    settings = {"seed": seed, "params": profile.name, "scale": profile.scale, "ids": "dataset indices",
                "frost_source": frost_source() if "frost" in names else None}
    records = {role: _corruption_record(names, sevs, correct[role], clean[role], settings, seconds) for role in ROLES}
    tensors = {f"{role}.corruption_correct": correct[role] for role in ROLES}
    return records, _corruption_transfer(records, names, sevs), tensors


def _corruption_record(names: list[str], sevs: list[int], correct: torch.Tensor, clean: torch.Tensor,
                       settings: dict[str, Any], seconds: float) -> dict[str, Any]:
    n = int(clean.numel())
    per_corruption = {}
    for ci, name in enumerate(names):
        per_corruption[name] = {
            "per_severity": {str(s): Proportion.of(int(correct[ci, si].sum()), n).to_dict() for si, s in enumerate(sevs)},
            "mean": float(correct[ci].double().mean()),
        }
    return {
        "status": "ok",
        "n": n,
        "corruptions": list(names),
        "severities": list(sevs),
        "clean": Proportion.of(int(clean.sum()), n).to_dict(),
        "per_corruption": per_corruption,
        "per_severity": {str(s): mean_interval(correct[:, si].double().mean(0)) for si, s in enumerate(sevs)},
        "mean": mean_interval(correct.double().mean((0, 1))),
        "settings": settings,
        "seconds": seconds,
    }


def _ratio(s: float, t: float) -> float | None:
    return s / t if t > 0 else None


def _corruption_transfer(records: dict[str, dict[str, Any]], names: list[str], sevs: list[int]) -> dict[str, Any]:
    """Student over teacher: mean corruption accuracy, per severity, per corruption (mean over severities)."""
    t, s = records["teacher"], records["student"]
    return {
        "mean": {"teacher": t["mean"]["value"], "student": s["mean"]["value"],
                 "ratio": _ratio(s["mean"]["value"], t["mean"]["value"])},
        "per_severity": {str(v): {"teacher": t["per_severity"][str(v)]["value"], "student": s["per_severity"][str(v)]["value"],
                                  "ratio": _ratio(s["per_severity"][str(v)]["value"], t["per_severity"][str(v)]["value"])}
                         for v in sevs},
        "per_corruption": {c: {"teacher": t["per_corruption"][c]["mean"], "student": s["per_corruption"][c]["mean"],
                               "ratio": _ratio(s["per_corruption"][c]["mean"], t["per_corruption"][c]["mean"])}
                           for c in names},
    }
