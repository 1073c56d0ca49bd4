"""``robkd audit --dry-run``: check everything an audit needs and estimate its cost, without attacking.

:func:`dry_run` makes the same :class:`~robkd.auditing.plan.AuditPlan` a real run makes (models loaded
and checked, data, gates, radii, attacks, the ``--out`` checks) and writes nothing. The cost is counted
in forward+backward passes per model and phase (the attacks' own ``cost``; an upper bound: the cascade
attacks only the samples still robust), and turned into seconds by timing a few forward+backward passes
of each model on one batch (certification: a bound pass on a few samples).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from robkd.auditing.config import AuditConfig
from robkd.auditing.plan import ROLES, AuditPlan, make_plan

#: forward+backward passes per sample of the attack-based sanity checks (robkd.analysis.sanity): the large
#: radius (pgd-20), pgd-20 against pgd-200 at the middle radius, pgd-20 per radius (monotonicity, >1 radius),
#: and with autoattack in the suite Square (1000 queries) after APGD-CE and APGD-T.
SANITY_PASSES = {"large_radius": 20, "more_steps": 220, "per_radius": 20, "blackbox": 1000 + 100 + 900}
#: forward passes per sample that build the self-test's binary readout: the inner points of
#: :func:`robkd.analysis.selftest.attack_self_test` (its default ``n_inner``)
SELF_TEST_INNER = 64


@dataclasses.dataclass(frozen=True)
class PhaseCost:
    """One phase of the audit for one model: passes (forward+backward, all samples) and the estimated time."""

    model: str
    phase: str
    passes: float
    seconds: float | None  # None: not estimated


@dataclasses.dataclass(frozen=True)
class AuditEstimate:
    """The plan of a dry run and its estimated cost."""

    plan: AuditPlan
    phases: tuple[PhaseCost, ...]
    pass_seconds: dict[str, float]  # seconds of one forward+backward pass of one sample, per model

    @property
    def total_seconds(self) -> float:
        """The sum of the phases' estimated seconds (phases without an estimate count 0)."""
        return sum(p.seconds or 0.0 for p in self.phases)


def dry_run(cfg: AuditConfig, *, resume: bool = False, overwrite: bool = False, repeats: int = 2) -> AuditEstimate:
    """Validate the audit ``cfg`` describes like a real run (raises its errors) and estimate its cost; writes
    nothing and attacks nothing."""
    from robkd.auditing.store import check_out_dir
    from robkd.distributed import init_from_env

    cfg = copy.deepcopy(cfg).validate()
    if cfg.out:
        check_out_dir(Path(cfg.out), resume=resume, overwrite=overwrite)
    plan = make_plan(cfg, None, None, init_from_env(cfg.device))
    return estimate(plan, repeats=repeats)


def estimate(plan: AuditPlan, *, repeats: int = 2) -> AuditEstimate:
    """The cost of the audit ``plan`` (see the module docstring)."""
    from robkd.attacks import attack_cost
    from robkd.types import format_radius

    cfg, n, radii = plan.cfg, plan.n, plan.radii
    fwd, fb = {}, {}
    for role in ROLES:
        fwd[role], fb[role] = _time_passes(plan.models[role], plan.x, plan.y, cfg.batch_size, repeats)
    phases: list[PhaseCost] = []
    reused = _reused(plan)
    for role in ROLES:
        if role in reused:  # an identical model of this run, or a cache entry (re-checked: two forward passes)
            twin = reused[role] != "cache"
            passes = 0.0 if twin else 2.0 * n
            phases.append(PhaseCost(role, f"same as the {reused[role]}: attacked once" if twin
                                    else "from the cache (re-check of its clean and adversarial predictions)",
                                    passes, passes * fwd[role]))
            phases += _extra_phases(plan, role, fwd, fb)
            continue
        phases.append(PhaseCost(role, "clean predictions", float(n), n * fwd[role]))
        for name in plan.suite.order:
            passes = n * float(attack_cost(name, plan.norm))
            for r in radii:
                phases.append(PhaseCost(role, f"{name} eps={format_radius(r)}", passes, passes * fb[role]))
        if cfg.certify:
            secs = _time_certify(plan, role)
            per = len(radii) + (14 if cfg.linear_region_radius else 0)
            phases.append(PhaseCost(role, f"certify {cfg.certify} ({len(radii)} radii"
                                    + (" + linear-region radius" if cfg.linear_region_radius else "") + ")",
                                    0.0, None if secs is None else secs * n * per))
        s = _sanity_passes(cfg, len(radii))
        phases.append(PhaseCost(role, f"sanity checks ({min(cfg.sanity_n, n)} samples)", s, s * fb[role]))
        phases += _extra_phases(plan, role, fwd, fb)
    if cfg.llm:
        from robkd.analysis.llm import RESTART_PLAN

        # the LLM runs at least one cycle of its restart portfolio per model (more only where a run still gains)
        runs = max(cfg.llm_restarts, len(RESTART_PLAN))
        passes = n * len(radii) * cfg.llm_steps * runs * 3
        phases.append(PhaseCost("pair", f"prop2 / LLM ({cfg.llm_steps} steps x {runs} runs)", passes,
                                passes * (fb["teacher"] + fb["student"]) / 2))
    return AuditEstimate(plan=plan, phases=tuple(phases), pass_seconds=dict(fb))


def _reused(plan: AuditPlan) -> dict[str, str]:
    """Roles whose block the run will not compute: ``role -> "cache"`` (an entry for its key exists; the run
    still re-checks it and computes the model when the re-check fails) or ``role -> <identical role>``."""
    from robkd.auditing.reuse import Reuse

    reuse = Reuse.for_plan(plan)
    out: dict[str, str] = {}
    for role in ROLES:
        twin = reuse.twin(role)
        if twin is not None:
            out[role] = twin
        elif reuse.cache is not None and reuse.cache.path(reuse.keys[role]).is_file():
            out[role] = "cache"
    return out


def _extra_phases(plan: AuditPlan, role: str, fwd: dict[str, float], fb: dict[str, float]) -> list[PhaseCost]:
    """The optional analyses of one model: the transfer attack (an upper bound: PGD-20 on the other model for
    every sample at every radius, then one forward pass here), the attack self-test (its inner points and
    one run of each tested attack per sample) and the common corruptions (one forward pass per corruption,
    severity and sample; generating the images is not counted)."""
    from robkd.attacks import attack_cost

    cfg, n, out = plan.cfg, plan.n, []
    other = ROLES[1] if role == ROLES[0] else ROLES[0]
    if "transfer" in cfg.attacks:
        pgd = n * len(plan.radii) * 20.0
        out.append(PhaseCost(role, "transfer (pgd-20 on the other model, at most)", pgd,
                             pgd * fb[other] + n * len(plan.radii) * fwd[role]))
    if cfg.self_test:
        from robkd.auditing.robustness_stage import self_test_attacks

        k = min(cfg.self_test_n, n)
        attacks = self_test_attacks(plan)
        passes = k * sum(float(attack_cost(a, plan.norm)) for a in attacks)
        out.append(PhaseCost(role, f"attack self-test ({k} samples, {len(attacks)} attacks)", passes,
                             passes * fb[role] + k * (SELF_TEST_INNER + 2) * fwd[role]))
    if cfg.corruptions:
        from robkd.auditing.robustness_stage import corruption_names

        names = corruption_names(plan)
        passes = float(n * len(names) * len(cfg.severities))
        out.append(PhaseCost(role, f"corruptions ({len(names)} x {len(cfg.severities)} severities)", passes,
                             passes * fwd[role]))
    return out


def _sanity_passes(cfg: AuditConfig, n_radii: int) -> float:
    if cfg.sanity_n <= 0:
        return 0.0
    per = SANITY_PASSES["large_radius"] + SANITY_PASSES["more_steps"]
    if n_radii > 1:
        per += SANITY_PASSES["per_radius"] * n_radii
    if any(a in ("autoattack", "autoattack-plus") for a in cfg.attacks):
        per += SANITY_PASSES["blackbox"]
    return float(cfg.sanity_n * per)


def _time_passes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 repeats: int) -> tuple[float, float]:
    """Seconds per sample of a forward pass and of a forward+backward pass (input gradient) on one batch."""
    xb, yb = x[:batch_size], y[:batch_size]
    m = int(xb.shape[0])

    def fwd_bwd() -> None:
        xg = xb.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xg).float(), yb)
            torch.autograd.grad(loss, xg)

    fwd_bwd()  # warm-up (lazy initialisation, kernel selection)
    _sync(xb)
    t0 = time.perf_counter()
    for _ in range(max(1, repeats)):
        fwd_bwd()
    _sync(xb)
    fb = (time.perf_counter() - t0) / max(1, repeats) / m
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(max(1, repeats)):
            model(xb)
    _sync(xb)
    return (time.perf_counter() - t0) / max(1, repeats) / m, fb


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def _time_certify(plan: AuditPlan, role: str, k: int = 4) -> float | None:
    """Seconds per sample of one certification at the largest radius, timed on ``k`` samples (None when the
    model cannot be certified)."""
    from robkd.bounds import certify
    from robkd.errors import UnsupportedModelError

    xb, yb = plan.x[:k], plan.y[:k]
    t0 = time.perf_counter()
    try:
        certify(plan.models[role], xb, yb, max(plan.radii), norm=plan.norm, method=str(plan.cfg.certify), batch_size=k)
    except UnsupportedModelError:
        return None
    return (time.perf_counter() - t0) / int(xb.shape[0])


def format_estimate(est: AuditEstimate) -> list[str]:
    """The plan and the cost estimate as plain text lines (the CLI prints them)."""
    from robkd.types import format_radius
    from robkd.utils.progress import format_duration

    plan, cfg = est.plan, est.plan.cfg
    d = plan.data_info
    lines = [
        "robkd audit --dry-run: everything checked (models, data, gates, output directory); nothing was attacked or written",
        f"  teacher: {cfg.teacher}",
        f"  student: {cfg.student}",
        f"  data: {d['dataset']} {d['split']}, n={d['n']} (seed {cfg.seed}), device {plan.device}, batch size {cfg.batch_size}",
        f"  threat model: {plan.norm.value}, radii {', '.join(format_radius(r) for r in plan.radii)}; "
        f"attacks (cascade order) {', '.join(plan.suite.order)}",
        f"  gates: {'; '.join(cfg.gates) if cfg.gates else 'none'} (judged on {cfg.gate_on})",
        f"  output: {cfg.out or '(none: results are not written)'}",
        "  one forward+backward pass per sample: "
        + ", ".join(f"{role} {1000 * est.pass_seconds[role]:.3g} ms" for role in ROLES),
        "cost estimate (forward+backward passes; attacks: an upper bound, the cascade attacks only samples still robust):",
    ]
    width = max(len(f"{p.model}: {p.phase}") for p in est.phases)
    for p in est.phases:
        passes = f"{p.passes:>14,.0f} passes" if p.passes else " " * 21
        secs = format_duration(p.seconds) if p.seconds is not None else "not estimated"
        lines.append(f"  {(p.model + ': ' + p.phase).ljust(width)}  {passes}  ~{secs}")
    lines.append(f"estimated total: ~{format_duration(est.total_seconds)} on {plan.device} "
                 "(rerun without --dry-run to start the audit)")
    return lines


def estimate_to_dict(est: AuditEstimate) -> dict[str, Any]:
    """The estimate as JSON-safe data (``--dry-run --json``)."""
    return {"config": est.plan.cfg.to_dict(), "n": est.plan.n, "radii": list(est.plan.radii),
            "pass_seconds": est.pass_seconds, "total_seconds": est.total_seconds,
            "phases": [dataclasses.asdict(p) for p in est.phases]}
