"""The transfer-attack stage of an audit: each model attacked with the other's adversarial examples.

Runs on the whole set after both models' suites (and after gathering the shards under torchrun, like the
Proposition-2 terms): for each direction (teacher->student, student->teacher)
:func:`robkd.attacks.transfer.transfer_attack` re-checks on the target the examples the source's suite kept, and
runs PGD-20 on the source for the samples it kept none of. :func:`fold` adds the result to each model's suite
outcome as the attack ``transfer`` (so the worst case, ``after_attack`` and the gates count it) before
aggregation; the sanity checks see the suites without it (they judge each model's own attacks).

Not cached: a model's cached block (:mod:`robkd.auditing.cache`) is keyed on that model alone and holds its own
suite (the key's attack list leaves ``transfer`` out); the transfer outcome depends on the other model, so it is
computed in every audit from the two blocks (cached or not), never stored inside one. Its cost is one forward
pass per reused example plus PGD-20 on the other model for the samples without one.

Gradient masking: the flag ``transfer-beats-white-box`` (fails under ``--strict``) is raised for a model when,
at some radius, the other model's examples break more than ``max(2, 2% of the audited samples)`` samples that
the model's own attacks left robust: a transferred (black-box) example should not beat attacks that see the
model's own gradients, so their gradients are likely masked.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping

import torch

from robkd.attacks.transfer import TRANSFER, TransferOutcome, fold_transfer, transfer_attack
from robkd.auditing.plan import ROLES, AuditPlan
from robkd.auditing.stages import EventFn, ModelOutcome
from robkd.auditing.stats import Proportion
from robkd.types import format_radius

log = logging.getLogger(__name__)

#: the flag fires when the transfer attack breaks more than max(FLAG_MIN_SAMPLES, FLAG_FRACTION * n) samples
FLAG_MIN_SAMPLES = 2
FLAG_FRACTION = 0.02
FLAG_CODE = "transfer-beats-white-box"


def _other(role: str) -> str:
    return ROLES[1] if role == ROLES[0] else ROLES[0]


def direction(source: str, target: str) -> str:
    """The results key of a direction, e.g. ``teacher_to_student``."""
    return f"{source}_to_{target}"


def enabled(plan: AuditPlan) -> bool:
    """Whether the audit's attack list has the transfer attack."""
    return TRANSFER in plan.cfg.attacks


def run(plan: AuditPlan, outcomes: Mapping[str, ModelOutcome], event: EventFn) -> dict[str, TransferOutcome]:
    """Per target role, the transfer outcome from the other model (both suites on the whole set)."""
    out: dict[str, TransferOutcome] = {}
    ids = plan.indices.clone()  # the dedicated PGD's random starts are seeded per dataset index
    for target in ROLES:
        source = _other(target)
        event("start", {"model": target, "stage": f"transfer attack ({source} -> {target})", "total": plan.n})
        out[target] = transfer_attack(plan.models[target], plan.models[source], plan.x, plan.y,
                                      outcomes[target].suite, outcomes[source].suite, seed=plan.cfg.seed,
                                      batch_size=plan.cfg.batch_size, sample_ids=ids, names=(source, target))
        event("advance", {"model": target, "n": plan.n})
        event("done", {"model": target})
        log.info("transfer %s -> %s: %s", source, target,
                 ", ".join(f"{c['broken']} broken @ {format_radius(r)}" for r, c in zip(plan.radii, out[target].per_radius)))
    return out


def fold(plan: AuditPlan, outcomes: Mapping[str, ModelOutcome],
         transfers: Mapping[str, TransferOutcome]) -> dict[str, ModelOutcome]:
    """Each outcome with the transfer attack folded into its suite (at ``transfer``'s place in the attack list)."""
    position = list(plan.cfg.attacks).index(TRANSFER)
    out = {}
    for role in ROLES:
        o = outcomes[role]
        suite = fold_transfer(o.suite, transfers[role], position)
        per_attack = {**o.timings.per_attack_s, TRANSFER: float(transfers[role].seconds)}
        timings = dataclasses.replace(o.timings, per_attack_s=per_attack)
        out[role] = dataclasses.replace(o, suite=suite, timings=timings)
    return out


def flag_limit(n: int) -> int:
    """The most samples the transfer attack may break beyond a model's own attacks without a flag."""
    return max(FLAG_MIN_SAMPLES, int(math.floor(FLAG_FRACTION * n)))


def flags(plan: AuditPlan, transfers: Mapping[str, TransferOutcome]) -> list[dict[str, Any]]:
    """The ``transfer-beats-white-box`` flag of each model the other's examples break too often (see the module
    docstring); one flag per model, at the radius with the most such samples."""
    limit = flag_limit(plan.n)
    found = []
    for role in ROLES:
        t = transfers[role]
        counts = [c["broken"] for c in t.per_radius]
        worst = max(range(len(counts)), key=lambda i: counts[i])
        k = counts[worst]
        if k <= limit:
            continue
        found.append({
            "code": FLAG_CODE,
            "message": (f"the {t.source}'s adversarial examples (transfer attack) break {k} of {plan.n} samples of the "
                        f"{role} at radius {format_radius(plan.radii[worst])} that the {role}'s own attacks left robust "
                        f"(more than max({FLAG_MIN_SAMPLES}, {FLAG_FRACTION:.0%} of the samples) = {limit})"),
            "suggestion": ("gradient masking: the attacks that see this model's gradients miss adversarial examples a "
                           "black-box attack finds; its robust accuracy without the transfer attack is overestimated "
                           "(use adaptive attacks: EOT, BPDA, or AutoAttack with Square)"),
            "model": role,
            "value": k / plan.n,
        })
    return found


def records(plan: AuditPlan, transfers: Mapping[str, TransferOutcome],
            own: Mapping[str, ModelOutcome]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``transfer_attack`` record (per direction and radius) and its tensors
    ``transfer_attack.<direction>.broken`` (``(R, N)`` bool); ``own``: the outcomes before the fold."""
    n = plan.n
    rec: dict[str, Any] = {"steps": None, "flag_rule": {"code": FLAG_CODE, "min_samples": FLAG_MIN_SAMPLES,
                                                        "fraction": FLAG_FRACTION, "limit": flag_limit(n)},
                           "directions": {}}
    tensors: dict[str, torch.Tensor] = {}
    for target in ROLES:
        t = transfers[target]
        key = direction(t.source, target)
        robust_own = own[target].suite.robust.cpu().bool()
        rows = []
        for i, r in enumerate(plan.radii):
            c = t.per_radius[i]
            before = int(robust_own[i].sum())
            rows.append({"radius": r, "radius_text": format_radius(r), **c,
                         "robust_own": Proportion.of(before, n).to_dict(),
                         "robust_with_transfer": Proportion.of(before - c["broken"], n).to_dict()})
        rec["steps"] = t.steps
        rec["directions"][key] = {"source": t.source, "target": target, "seconds": t.seconds, "per_radius": rows}
        tensors[f"transfer_attack.{key}.broken"] = t.broken.cpu().bool()
    return rec, tensors
