"""The audit's stages, each a function from the plan (and earlier outcomes) to a typed outcome.

Per model, on this process' shard of the samples (:func:`run_model`): clean predictions, the attack
:class:`~robkd.attacks.Suite` (state saved after every finished (attack, radius)) and the optional
certification, as a :class:`ModelOutcome`. On the whole set (rank 0): the non-finite output counts,
the Proposition-2 terms on the pair and the sanity checks. Every stage that may be resumed saves its
work in the :class:`~robkd.auditing.store.StateStore` and picks it up from there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import nn

from robkd.auditing.plan import ROLES, AuditPlan
from robkd.errors import UnsupportedModelError
from robkd.types import Norm
from robkd.utils.logits import NON_FINITE, predict

if TYPE_CHECKING:
    from robkd.attacks import SuiteResult
    from robkd.auditing.store import StateStore

log = logging.getLogger(__name__)

#: progress events: ``on_event(kind, info)`` (shown by robkd.auditing.events.EventDisplay). Every phase that
#: takes more than a moment reports, with ``model`` (teacher, student, pair or both) and ``stage`` (a short
#: name: "clean predictions", "certify crown", "prop2", "sanity: more steps", ...) and ``radius`` (a float,
#: when the phase is per radius) in ``info``:
#:   "start"      a phase begins; ``total`` (units, e.g. samples; None when unknown) - a start inside a
#:                running phase nests;
#:   "advance"    ``n`` more units of the innermost phase are done;
#:   "done"       the innermost phase ended;
#:   "progress"   absolute progress of one (attack, radius) of the suite: ``attack``, ``radius``, ``done``,
#:                ``total``, ``seconds`` (no start/done: a new (model, attack, radius) opens a new task);
#:   "checkpoint" the work so far is saved for --resume (``stage``): the only point where --time-limit
#:                stops a run (robkd.auditing.events.TimeLimit raises there), so send it after every save.
EventFn = Callable[[str, dict[str, Any]], None]


# ----------------------------------------------------------------------------- outcomes
@dataclasses.dataclass(frozen=True)
class StageTimings:
    """Wall-clock seconds of one model's stages (``results.json``: ``<role>.timings``)."""

    clean_s: float
    attacks_s: float
    per_attack_s: Mapping[str, float]
    certify_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The results record (``certify_s`` only when certification ran)."""
        out: dict[str, Any] = {"clean_s": self.clean_s, "attacks_s": self.attacks_s, "per_attack_s": dict(self.per_attack_s)}
        if self.certify_s is not None:
            out["certify_s"] = self.certify_s
        return out

    @staticmethod
    def slowest(parts: Sequence["StageTimings"]) -> "StageTimings":
        """The timings of a sharded run: per stage and per attack, the slowest shard."""
        per_attack: dict[str, float] = {}
        for p in parts:
            for k, v in p.per_attack_s.items():
                per_attack[k] = max(per_attack.get(k, 0.0), float(v))
        certify = [p.certify_s for p in parts if p.certify_s is not None]
        return StageTimings(clean_s=max(p.clean_s for p in parts), attacks_s=max(p.attacks_s for p in parts),
                            per_attack_s=per_attack, certify_s=max(certify) if certify else None)


@dataclasses.dataclass(frozen=True)
class RadiusCertification:
    """Per-sample certification of one model at one radius."""

    certified: torch.Tensor  # (n,) bool
    unstable: torch.Tensor  # (n,) int64: unstable ReLUs
    linear_region: torch.Tensor  # (n,) bool: the whole ball inside one linear region
    status: torch.Tensor  # (n,) int8: 1 certified, 2 falsified, 0 unknown
    total_relus: int  # -1: unknown
    linear_region_radius: torch.Tensor | None = None  # (n,) float: largest radius inside one linear region

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The resume-state form (``state/certify-<role>-<i>.safetensors``; without the linear-region radius,
        which is saved once per model)."""
        return {"certified": self.certified, "unstable": self.unstable, "linear_region": self.linear_region,
                "status": self.status, "total_relus": torch.tensor([self.total_relus])}

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor]) -> "RadiusCertification":
        """Inverse of :meth:`to_tensors`."""
        return cls(certified=t["certified"], unstable=t["unstable"], linear_region=t["linear_region"],
                   status=t["status"], total_relus=int(t["total_relus"][0]))


@dataclasses.dataclass(frozen=True)
class CertificationUnsupported:
    """Certification could not run on a model (an operation the bounds do not support)."""

    method: str
    reason: str
    unsupported: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The results record (``<role>.certification``)."""
        return {"status": "unsupported", "method": self.method, "reason": self.reason, "unsupported": list(self.unsupported)}


#: one :class:`RadiusCertification` per audited radius, or why there are none
Certification = tuple[RadiusCertification, ...] | CertificationUnsupported


@dataclasses.dataclass(frozen=True)
class ModelOutcome:
    """What the per-model stages found for one model on (a shard of) the samples."""

    role: str
    clean_pred: torch.Tensor  # (n,) int64 on the CPU; NON_FINITE for a non-finite output
    suite: SuiteResult
    certification: Certification | None
    timings: StageTimings
    resumed: tuple[tuple[str, float], ...]  # (attack, radius) pairs picked up from the saved state

    def cpu(self) -> "ModelOutcome":
        """The same outcome with every tensor on the CPU (to gather it from another process)."""
        s = self.suite
        suite = dataclasses.replace(s, clean_correct=s.clean_correct.cpu(), broken_by=s.broken_by.cpu(),
                                    x_adv=s.x_adv.detach().cpu(), adv_radius=s.adv_radius.detach().cpu())
        return dataclasses.replace(self, clean_pred=self.clean_pred.cpu(), suite=suite)


def merge_outcomes(parts: Sequence[ModelOutcome], positions: Sequence[torch.Tensor], n: int) -> ModelOutcome:
    """One whole-set outcome from per-shard outcomes (``parts[k]`` covers the samples at ``positions[k]``)."""
    from robkd.distributed import concat_by_position, merge_suite_results

    def cat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        return concat_by_position(list(ts), positions, n)

    head = parts[0]
    cert: Any = None
    if head.certification is not None:
        unsupported = [p.certification for p in parts if isinstance(p.certification, CertificationUnsupported)]
        if unsupported:
            cert = unsupported[0]
        else:
            shards = [p.certification for p in parts]
            cert = tuple(
                RadiusCertification(
                    certified=cat([c[i].certified for c in shards]), unstable=cat([c[i].unstable for c in shards]),
                    linear_region=cat([c[i].linear_region for c in shards]), status=cat([c[i].status for c in shards]),
                    total_relus=shards[0][i].total_relus,
                    linear_region_radius=(None if shards[0][i].linear_region_radius is None
                                          else cat([c[i].linear_region_radius for c in shards])))
                for i in range(len(shards[0])))
    return ModelOutcome(
        role=head.role,
        clean_pred=cat([p.clean_pred for p in parts]),
        suite=merge_suite_results([p.suite for p in parts], positions, n),
        certification=cert,
        timings=StageTimings.slowest([p.timings for p in parts]),
        # a pair counts as resumed when every shard picked it up from its saved state
        resumed=tuple(sorted(set.intersection(*[set(p.resumed) for p in parts]))),
    )


# ----------------------------------------------------------------------------- per model, per shard
def run_model(plan: AuditPlan, role: str, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor,
              state: StateStore | None, event: EventFn) -> ModelOutcome:
    """Clean predictions, the attack suite and (``certify``) certification of one model on the rows ``(x, y)``,
    the samples ``sample_ids`` of the audit."""
    model = plan.models[role]
    t0 = time.perf_counter()
    event("start", {"model": role, "stage": "clean predictions", "total": int(x.shape[0])})
    clean_pred = predict_clean(model, x, plan.cfg.batch_size, on_batch=lambda m: event("advance", {"model": role, "n": m}))
    event("done", {"model": role})
    clean_s = time.perf_counter() - t0
    prior = state.load_suite(role) if state is not None else None
    resumed = () if prior is None else tuple(prior.done)
    t0 = time.perf_counter()
    sres = run_suite(plan, role, model, x, y, sample_ids, prior, state, event, clean_pred)
    attacks_s = time.perf_counter() - t0
    cert = None
    certify_s = None
    if plan.cfg.certify:
        t0 = time.perf_counter()
        cert = certify_model(plan, role, model, x, y, state, event)
        certify_s = time.perf_counter() - t0
    timings = StageTimings(clean_s=clean_s, attacks_s=attacks_s, per_attack_s={k: float(v) for k, v in sres.seconds.items()},
                           certify_s=certify_s)
    return ModelOutcome(role=role, clean_pred=clean_pred, suite=sres, certification=cert, timings=timings, resumed=resumed)


def predict_clean(model: nn.Module, x: torch.Tensor, batch_size: int,
                  on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Predicted classes on the CPU (``NON_FINITE`` for a row of non-finite logits); ``on_batch(n)`` after each batch."""
    preds = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            preds.append(predict(model(x[s : s + batch_size])))
            if on_batch is not None:
                on_batch(int(preds[-1].shape[0]))
    return torch.cat(preds).cpu()


def run_suite(plan: AuditPlan, role: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor,
              prior: SuiteResult | None, state: StateStore | None, event: EventFn,
              clean_pred: torch.Tensor | None = None) -> SuiteResult:
    """The attack suite on ``(x, y)`` whose rows are the samples ``sample_ids`` of the audit (random starts
    are seeded per sample id, so a shard gets the noise the whole-set run gives those samples);
    ``clean_pred``: the model's clean predictions on those rows (the suite then makes no clean pass of its own)."""
    def on_progress(info: dict[str, Any]) -> None:
        event("progress", {"model": role, "stage": info.get("attack"), **info})

    def on_checkpoint(partial: SuiteResult) -> None:
        if state is not None:
            state.save_tensors(f"suite-{role}", partial.to_tensors(external_adv=True))
            event("checkpoint", {"model": role, "stage": "attacks"})

    # the kept adversarial examples live in a file (state/suite-<role>.xadv, or an anonymous temporary
    # file without --out), so the audit's memory does not grow with them (robkd.utils.spill)
    spill = state.root / f"suite-{role}.xadv" if state is not None else True
    res = plan.suite.run(model, x, y, list(plan.radii), state=prior, on_progress=on_progress, on_checkpoint=on_checkpoint,
                         sample_ids=sample_ids, spill=spill, clean_pred=clean_pred)
    if state is not None:
        state.save_tensors(f"suite-{role}", res.to_tensors(external_adv=True))
    return res


def certify_model(plan: AuditPlan, role: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  state: StateStore | None, event: EventFn) -> Certification:
    """Per-radius certification of the rows ``(x, y)`` (saved for resume), or why the model cannot be certified."""
    from robkd.bounds import certify

    method = str(plan.cfg.certify)
    n = int(y.shape[0])
    bs = plan.cfg.batch_size
    out: list[RadiusCertification] = []
    for i, r in enumerate(plan.radii):
        name = f"certify-{role}-{i}"
        saved = state.load_tensors(name) if state is not None else None
        if saved is not None:
            out.append(RadiusCertification.from_tensors(saved))
            continue
        event("start", {"model": role, "stage": f"certify {method}", "radius": r, "total": n})
        cert, unstable, region, status = [], [], [], []
        total_relus = None
        try:
            for s in range(0, n, bs):
                res = certify(model, x[s : s + bs], y[s : s + bs], r, norm=plan.norm, method=method)
                cert.append(res.certified.cpu().bool())
                unstable.append(res.unstable.cpu().long())
                region.append(res.linear_region.cpu().bool())
                status += [{"certified": 1, "falsified": 2}.get(st, 0) for st in res.status]
                total_relus = int(res.total_relus)
                event("advance", {"model": role, "n": int(res.certified.shape[0])})
        except UnsupportedModelError as exc:
            event("done", {"model": role})
            log.warning("%s: certification (%s) unsupported: %s", role, method, exc)
            return CertificationUnsupported(method=method, reason=str(exc), unsupported=tuple(exc.unsupported))
        event("done", {"model": role})
        rc = RadiusCertification(certified=torch.cat(cert), unstable=torch.cat(unstable), linear_region=torch.cat(region),
                                 status=torch.tensor(status, dtype=torch.int8),
                                 total_relus=total_relus if total_relus is not None else -1)
        if state is not None:
            state.save_tensors(name, rc.to_tensors())
            event("checkpoint", {"model": role, "stage": f"certify {method}"})
        out.append(rc)
    if plan.cfg.linear_region_radius:
        radius = _linear_region_radius(plan, role, model, x, state, event)
        # radius-independent: computed once per model, repeated in every radius' record (shards merge per radius)
        out = [dataclasses.replace(rc, linear_region_radius=radius) for rc in out]
    return tuple(out)


def _linear_region_radius(plan: AuditPlan, role: str, model: nn.Module, x: torch.Tensor, state: StateStore | None,
                          event: EventFn) -> torch.Tensor:
    """Per sample, the largest radius whose ball stays inside one linear region (saved for resume)."""
    from robkd.bounds import linear_region_radius

    name = f"certify-{role}-lrradius"
    saved = state.load_tensors(name) if state is not None else None
    if saved is not None:
        return saved["radius"]
    method = str(plan.cfg.certify)
    n, bs = int(x.shape[0]), plan.cfg.batch_size
    event("start", {"model": role, "stage": f"linear-region radius ({method})", "total": n})
    lr = [linear_region_radius(model, x[s : s + bs], norm=plan.norm, method=method, batch_size=bs) for s in range(0, n, bs)]
    event("advance", {"model": role, "n": n})
    event("done", {"model": role})
    radius = torch.cat(lr).float().cpu()
    if state is not None:
        state.save_tensors(name, {"radius": radius})
        event("checkpoint", {"model": role, "stage": "linear-region radius"})
    return radius


# ----------------------------------------------------------------------------- whole set (rank 0)
@dataclasses.dataclass(frozen=True)
class NonFiniteCounts:
    """Audited samples whose output was NaN or infinite: on the clean input and on the kept adversarial example."""

    clean: int
    adversarial: int
    #: ``(N,)`` int64: the prediction on each kept adversarial example (the clean prediction where no attack
    #: broke the sample; ``NON_FINITE`` for non-finite logits), from the same forward pass as the counts
    adv_pred: torch.Tensor = dataclasses.field(compare=False, repr=False)

    def to_dict(self) -> dict[str, int]:
        """The results record (``<role>.non_finite``)."""
        return {"clean": self.clean, "adversarial": self.adversarial}


def count_non_finite(plan: AuditPlan, outcome: ModelOutcome) -> NonFiniteCounts:
    """How many audited samples got a non-finite output (NaN or inf logit): on the clean input, and on the
    verified adversarial example the suite kept; with the predictions on those examples (one forward pass over
    the broken samples serves both). Such samples are counted misclassified and not robust
    (robkd.utils.logits), whatever their label."""
    sres = outcome.suite
    pred = outcome.clean_pred.cpu().long().clone()
    rows = torch.isfinite(sres.adv_radius.cpu().double()).nonzero().flatten()
    if rows.numel():
        model, bs = plan.models[outcome.role], plan.cfg.batch_size
        with torch.no_grad():
            for s in range(0, rows.numel(), bs):
                idx = rows[s : s + bs]
                pred[idx] = predict(model(sres.adv_rows(idx).to(plan.device, plan.x.dtype))).cpu().long()
    return NonFiniteCounts(clean=int((outcome.clean_pred == NON_FINITE).sum().item()),
                           adversarial=int((pred[rows] == NON_FINITE).sum().item()), adv_pred=pred)


def non_finite_flags(counts: Mapping[str, NonFiniteCounts]) -> list[dict[str, Any]]:
    """The ``non-finite-outputs`` sanity flag (fails under ``--strict``) of each model that produced one."""
    flags = []
    for role in ROLES:
        nf = counts[role]
        if nf.clean or nf.adversarial:
            flags.append({
                "code": "non-finite-outputs",
                "message": (f"the {role} returned NaN or infinite logits on {nf.clean} clean input(s) and "
                            f"{nf.adversarial} adversarial example(s); those samples count as misclassified"),
                "suggestion": "a broken or diverged model (check its weights and normalisation): do not ship it",
                "model": role,
                "value": float(nf.clean + nf.adversarial),
            })
    return flags


@dataclasses.dataclass(frozen=True)
class Prop2Outcome:
    """The Proposition-2 terms of the pair: a JSON-safe summary per radius and ``(R, N)`` per-sample tensors."""

    steps: int
    summaries: tuple[dict[str, Any], ...]
    tensors: Mapping[str, torch.Tensor]  # field -> (R, N)


def prop2(plan: AuditPlan, state: StateStore | None, event: EventFn) -> Prop2Outcome:
    """The Proposition-2 terms on the whole set at every radius (saved for resume; the settings are in the
    state fingerprint, so a resume never mixes them)."""
    from robkd.analysis.prop2 import TENSOR_FIELDS, prop2_terms

    rows: dict[str, list[torch.Tensor]] = {f: [] for f in TENSOR_FIELDS}
    summaries = []
    for i, r in enumerate(plan.radii):
        name = f"prop2-{i}"
        saved_t = state.load_tensors(name) if state is not None else None
        saved_s = state.load_json(name) if state is not None else None
        if saved_t is None or saved_s is None:
            event("start", {"model": "pair", "stage": "prop2", "radius": r, "total": plan.n})
            res = prop2_terms(plan.models["teacher"], plan.models["student"], plan.x, plan.y, r, norm=plan.norm,
                              steps=plan.cfg.llm_steps, restarts=plan.cfg.llm_restarts, seed=plan.cfg.seed,
                              batch_size=plan.cfg.batch_size)
            event("advance", {"model": "pair", "n": plan.n})
            event("done", {"model": "pair"})
            saved_t = {f: getattr(res, f).detach().cpu() for f in TENSOR_FIELDS}
            saved_s = _json_safe(res.summary())
            if state is not None:
                state.save_tensors(name, saved_t)
                state.save_json(name, saved_s)
                event("checkpoint", {"model": "pair", "stage": "prop2"})
        for f in TENSOR_FIELDS:
            rows[f].append(saved_t[f])
        summaries.append(saved_s)
    return Prop2Outcome(steps=plan.cfg.llm_steps, summaries=tuple(summaries),
                        tensors={f: torch.stack(vals) for f, vals in rows.items()})


def _json_safe(obj: Any) -> Any:
    """Replace NaN/inf floats by None (results.json is strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def sanity(plan: AuditPlan, suites: Mapping[str, SuiteResult], state: StateStore | None = None,
           event: EventFn | None = None) -> list[dict[str, Any]]:
    """Sanity flags of both models' evaluations (results records). Each check of
    :func:`robkd.analysis.sanity.plan_checks` that calls the model is saved as ``sanity-<role>-<check>.json``
    with its key (its parameters, the suite's outcomes as a digest): a resume with the same key (e.g. one
    that only adds a gate) reuses it, a changed setting recomputes it. Events: the check's own ("stage",
    "check", "attack", "radius", "total"; "n") plus "model" and "phase" ("sanity <role> <check>"), and a
    "checkpoint" after each save."""
    from robkd.analysis.sanity import plan_checks

    send: EventFn = event or (lambda kind, info: None)
    eot = _eot_covers(plan.suite.attacks, plan.norm)  # each model's own suite (not the transfer attack)
    flags = []
    for role in ROLES:
        checks = plan_checks(plan.models[role], plan.x, plan.y, result=suites[role], radii=list(plan.radii),
                             norm=plan.norm, name=role, seed=plan.cfg.seed, extra=plan.cfg.sanity_n > 0,
                             n=plan.cfg.sanity_n or 64,  # --sanity-n 0: the cheap checks keep 64 samples
                             attacks=plan.suite.attacks, num_classes=int(plan.data_info["num_classes"]))
        for check in checks:
            for found in _sanity_unit(role, check, state, send):
                d = dict(found)
                if d.get("model") is None:
                    d["model"] = role
                if d["code"] == "stochastic-outputs" and eot:
                    d["handled_by"] = "EOT: every gradient attack of the suite averages its gradients over random passes"
                flags.append(d)
    return flags


def _sanity_unit(role: str, check: Any, state: StateStore | None, event: EventFn) -> list[dict[str, Any]]:
    """The flags (records) of one check of one model: saved ones when the key matches, else computed and saved."""
    name = f"sanity-{role}-{check.name.replace(' ', '-')}"
    key = _json_safe({"check": check.name, **check.params})
    if check.saved and state is not None:
        saved = state.load_json(name)
        if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("flags"), list):
            return saved["flags"]
    phase = f"sanity {role} {check.name}"

    def report(kind: str, info: dict[str, Any]) -> None:
        event(kind, {"model": role, "phase": phase, **info})

    found = _json_safe([f.to_dict() for f in check.run(report)])
    if check.saved and state is not None:
        state.save_json(name, {"key": key, "flags": found})
        event("checkpoint", {"model": role, "stage": f"sanity: {check.name}"})
    return found


def _eot_covers(attacks: Sequence[str], norm: Norm) -> bool:
    """True when every gradient-based attack of the suite uses EOT (``-eot<n>`` with n > 1, or autoattack-rand)."""
    from robkd.analysis.sanity import BLACK_BOX
    from robkd.attacks import make_attack

    for spec in attacks:
        if spec in BLACK_BOX or spec == "autoattack-rand":
            continue
        if getattr(make_attack(spec, norm, 0.0), "eot_iter", 1) <= 1:
            return False
    return True
