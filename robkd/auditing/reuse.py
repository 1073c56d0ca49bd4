"""Work an audit does not redo: a model's block taken from the result cache, identical models attacked once.

:func:`run_models` replaces the per-model loop of the audit. For each role, in order: a model identical to
one already done (same cache key: same weights, structure, normalisation, samples and settings) takes
that outcome; else a cache entry (:mod:`robkd.auditing.cache`) is loaded and re-checked
(:func:`recheck`: every stored adversarial example must still fool the model inside its ball, the clean
predictions must be the model's, the per-sample records must be consistent); else the model is attacked
(:func:`robkd.auditing.stages.run_model`) and its outcome stored. :class:`SanityState` gives the sanity
checks the same reuse. Each model's provenance goes to ``results.json`` as ``<role>.cache``.

Not cached: a run under torchrun (per-shard outcomes), and an outcome that picked up work from a
``--resume`` state (that work may have been computed under other settings than the key's).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from typing import Any, Mapping

import torch

from robkd.auditing.cache import (ResultCache, code_sha256, data_sha256, device_class, key_of, model_identity,
                                  resolve_dir)
from robkd.auditing.plan import ROLES, AuditPlan
from robkd.auditing.stages import (CertificationUnsupported, EventFn, ModelOutcome, RadiusCertification, StageTimings,
                                   predict_clean, run_model)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the key of a model's block
def key_material(plan: AuditPlan, role: str, data_hash: str) -> dict[str, Any]:
    """Everything that determines the block of ``role`` (see :mod:`robkd.auditing.cache`)."""
    from robkd.utils.env import package_version

    cfg = plan.cfg
    return {
        "model": model_identity(plan.models[role], plan.model_info[role]["weights_sha256"]),
        "data": {"sha256": data_hash, "n": plan.n},
        "norm": plan.norm.value,
        "radii": list(plan.radii),
        "attacks": list(plan.suite.attacks),  # the model's own suite: the transfer attack is never in its block
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,  # batch composition changes pyautoattack's random streams and float sums
        "certify": cfg.certify,
        "linear_region_radius": bool(cfg.linear_region_radius),
        "robkd": package_version("robkd"),
        "code": code_sha256(cfg.certify is not None),
        "torch": torch.__version__,
        "device": device_class(plan.device, plan.x.dtype),
    }


@dataclasses.dataclass
class Reuse:
    """The cache (None: off) and, per role, the key of its block and its ``results.json`` record."""

    cache: ResultCache | None
    keys: dict[str, str]
    materials: dict[str, dict[str, Any]]
    records: dict[str, dict[str, Any]]

    @classmethod
    def for_plan(cls, plan: AuditPlan, *, distributed: bool = False) -> "Reuse":
        """Keys of both roles; the cache of ``plan.cfg.cache`` (off under torchrun)."""
        root = None if distributed else resolve_dir(plan.cfg.cache)
        data_hash = data_sha256(plan.x, plan.y)
        materials = {role: key_material(plan, role, data_hash) for role in ROLES}
        keys = {role: key_of(m) for role, m in materials.items()}
        records = {role: {"key": keys[role], "hit": False, "created": None, "stored": False, "same_as": None}
                   for role in ROLES}
        return cls(ResultCache(root) if root is not None else None, keys, materials, records)

    def sanity_state(self, state: Any) -> Any:
        """What the sanity checks get as their state: ``state`` seen through the reuse (:class:`SanityState`),
        or None when there is no state, no cache and no identical pair (nothing to save or reuse)."""
        if state is None and self.cache is None and all(self.twin(r) is None for r in ROLES):
            return None
        return SanityState(state, self)

    def twin(self, role: str) -> str | None:
        """An earlier role whose block is the block of ``role`` (identical model, same key), if any."""
        for other in ROLES:
            if other == role:
                return None
            if self.keys[other] == self.keys[role]:
                return other
        return None


def run_models(plan: AuditPlan, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor, state: Any,
               event: EventFn, *, distributed: bool = False) -> tuple[dict[str, ModelOutcome], Reuse]:
    """Each role's outcome on the rows ``(x, y)`` (the samples ``sample_ids``): from an identical model, from
    the cache, or computed (then stored); and the reuse record."""
    reuse = Reuse.for_plan(plan, distributed=distributed)
    outcomes: dict[str, ModelOutcome] = {}
    for role in ROLES:
        twin = reuse.twin(role)
        if twin is not None:
            log.info("the %s is the %s (same weights, normalisation and settings): attacked once", role, twin)
            outcomes[role] = copy_outcome(outcomes[twin], role)
            reuse.records[role] = {**reuse.records[twin], "stored": False, "same_as": twin}
            continue
        if reuse.cache is not None:
            hit = load_outcome(plan, role, reuse, event)
            if hit is not None:
                outcomes[role] = hit
                continue
        outcome = run_model(plan, role, x, y, sample_ids, state, event)
        outcomes[role] = outcome
        if reuse.cache is not None and not outcome.resumed and outcome.suite.complete:
            header = reuse.cache.store(reuse.keys[role], reuse.materials[role], outcome_tensors(outcome),
                                       outcome_info(outcome))
            reuse.records[role]["stored"] = header is not None
    return outcomes, reuse


def copy_outcome(o: ModelOutcome, role: str) -> ModelOutcome:
    """``o`` as the outcome of ``role``, its tensors copied (the results file holds each role's own)."""
    from robkd.utils.spill import is_spilled, spill_copy

    s = o.suite
    x_adv = spill_copy(s.x_adv) if is_spilled(s.x_adv) else s.x_adv.clone()  # spilled: copied chunk by chunk
    suite = dataclasses.replace(s, clean_correct=s.clean_correct.clone(), broken_by=s.broken_by.clone(),
                                x_adv=x_adv, adv_radius=s.adv_radius.clone(), done=set(s.done),
                                rejected=dict(s.rejected), seconds=dict(s.seconds))
    cert = o.certification
    if isinstance(cert, tuple):
        cert = tuple(dataclasses.replace(
            rc, certified=rc.certified.clone(), unstable=rc.unstable.clone(), linear_region=rc.linear_region.clone(),
            status=rc.status.clone(),
            linear_region_radius=None if rc.linear_region_radius is None else rc.linear_region_radius.clone())
            for rc in cert)
    return dataclasses.replace(o, role=role, clean_pred=o.clean_pred.clone(), suite=suite, certification=cert)


# ----------------------------------------------------------------------------- entry <-> outcome
def outcome_tensors(o: ModelOutcome) -> dict[str, torch.Tensor]:
    """The tensors of an entry: ``suite.*`` (the suite's resume form), ``clean_pred``, ``cert.<i>.*``."""
    t = {f"suite.{k}": v for k, v in o.suite.to_tensors().items()}
    t["clean_pred"] = o.clean_pred.cpu().long()
    if isinstance(o.certification, tuple):
        for i, rc in enumerate(o.certification):
            t.update({f"cert.{i}.{k}": v for k, v in rc.to_tensors().items()})
        if o.certification and o.certification[0].linear_region_radius is not None:
            t["cert.lrradius"] = o.certification[0].linear_region_radius.float().cpu()
    return t


def outcome_info(o: ModelOutcome) -> dict[str, Any]:
    """The header fields of an entry besides the key: the role it was computed as, timings, certification."""
    cert: Any = None
    if isinstance(o.certification, CertificationUnsupported):
        cert = o.certification.to_dict()
    elif isinstance(o.certification, tuple):
        cert = {"status": "ok", "radii": len(o.certification)}
    return {"role": o.role, "n": int(o.clean_pred.shape[0]), "timings": o.timings.to_dict(), "certification": cert}


def _outcome(plan: AuditPlan, role: str, header: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> ModelOutcome:
    """The outcome an entry holds (raises KeyError/ValueError/TypeError/UsageError when it is malformed)."""
    from robkd.attacks import SuiteResult

    suite = SuiteResult.from_tensors({k[len("suite."):]: v for k, v in t.items() if k.startswith("suite.")})
    cert: Any = None
    info = header.get("certification")
    if plan.cfg.certify is not None:
        if not isinstance(info, dict):
            raise ValueError("no certification in the entry")
        if info.get("status") == "unsupported":
            cert = CertificationUnsupported(method=str(info["method"]), reason=str(info["reason"]),
                                            unsupported=tuple(str(u) for u in info["unsupported"]))
        else:
            rows = []
            lr = t.get("cert.lrradius")
            for i in range(len(plan.radii)):
                rc = RadiusCertification.from_tensors({k: t[f"cert.{i}.{k}"] for k in
                                                       ("certified", "unstable", "linear_region", "status", "total_relus")})
                if any(v.shape != (plan.n,) for v in (rc.certified, rc.unstable, rc.linear_region, rc.status)):
                    raise ValueError("certification tensors of the wrong shape")
                rows.append(dataclasses.replace(rc, linear_region_radius=lr) if plan.cfg.linear_region_radius else rc)
            if plan.cfg.linear_region_radius and (lr is None or lr.shape != (plan.n,)):
                raise ValueError("no linear-region radius in the entry")
            cert = tuple(rows)
    tm = header["timings"]
    timings = StageTimings(clean_s=float(tm["clean_s"]), attacks_s=float(tm["attacks_s"]),
                           per_attack_s={str(k): float(v) for k, v in tm["per_attack_s"].items()},
                           certify_s=float(tm["certify_s"]) if tm.get("certify_s") is not None else None)
    return ModelOutcome(role=role, clean_pred=t["clean_pred"].long(), suite=suite, certification=cert,
                        timings=timings, resumed=())


def load_outcome(plan: AuditPlan, role: str, reuse: Reuse, event: EventFn) -> ModelOutcome | None:
    """The cached outcome of ``role`` after :func:`recheck` (None: no usable entry; the model is computed)."""
    if reuse.cache is None:
        return None
    key = reuse.keys[role]
    found = reuse.cache.load(key, reuse.materials[role])
    if found is None:
        return None
    header, tensors = found
    try:
        outcome = _outcome(plan, role, header, tensors)
    except Exception as exc:  # noqa: BLE001 - a malformed entry is a miss
        log.info("audit cache: ignoring entry %s: malformed (%s: %s)", reuse.cache.path(key), type(exc).__name__, exc)
        return None
    t0 = time.perf_counter()
    event("start", {"model": role, "stage": "cache: re-check", "total": plan.n})
    why = recheck(plan, role, outcome)
    event("advance", {"model": role, "n": plan.n})
    event("done", {"model": role})
    if why is not None:
        log.warning("audit cache: entry %s fails its re-check (%s): computing the %s again", reuse.cache.path(key), why, role)
        return None
    reuse.records[role].update(hit=True, created=header.get("created"), recheck_s=time.perf_counter() - t0)
    log.info("the %s's figures come from the cache (computed %s)", role, header.get("created"))
    return outcome


def recheck(plan: AuditPlan, role: str, o: ModelOutcome) -> str | None:
    """Why a loaded outcome cannot be trusted for the model and samples of ``plan`` (None: it can).

    Checked: shapes and the suite's settings; the clean predictions are the model's (one forward pass);
    the per-sample records agree (misclassified-clean samples exactly the clean-wrong ones; a sample is
    broken exactly at the radii from its adversarial example's radius on); every stored adversarial
    example is in [0, 1], inside its radius and misclassified (one forward pass each, batched); an
    unbroken sample's stored example is the sample itself."""
    from robkd.attacks import CLEAN_WRONG, ROBUST, verify_adversarial

    s, n = o.suite, plan.n
    if s.attacks != list(plan.suite.attacks) or s.radii != list(plan.radii) or s.norm is not plan.norm or not s.complete:
        return "another suite (attacks, radii or norm) or an unfinished one"
    if o.clean_pred.shape != (n,) or s.n != n or tuple(s.x_adv.shape) != tuple(plan.x.shape):
        return f"shapes for {s.n} samples, not {n}"
    model, y = plan.models[role], plan.y.cpu()
    fresh = predict_clean(model, plan.x, plan.cfg.batch_size)
    if not torch.equal(fresh, o.clean_pred.cpu()):
        return "the model's clean predictions differ from the stored ones"
    clean = fresh == y
    broken_by = s.broken_by.cpu()
    if not torch.equal(s.clean_correct.cpu().bool(), clean):
        return "the stored clean-correct samples are not the model's"
    if bool(((broken_by < CLEAN_WRONG) | (broken_by >= len(s.attacks))).any()):
        return "unknown attack codes"
    if not torch.equal(broken_by == CLEAN_WRONG, (~clean).unsqueeze(0).expand_as(broken_by)):
        return "the misclassified-clean records disagree with the clean predictions"
    adv_r = s.adv_radius.detach().cpu()
    radii = torch.tensor(plan.radii, dtype=torch.float64)
    broken = (broken_by != ROBUST) & (broken_by != CLEAN_WRONG)  # (R, N)
    has = broken.any(0)
    first = torch.where(has, broken.long().argmax(0), torch.zeros_like(broken_by[0]))  # the smallest broken radius
    if not torch.equal(has, torch.isfinite(adv_r)):
        return "the broken samples disagree with their adversarial examples"
    if not torch.equal(broken, (torch.arange(len(plan.radii)).unsqueeze(1) >= first.unsqueeze(0)) & has.unsqueeze(0)):
        return "a sample broken at one radius but not at a larger one"
    rows = has.nonzero().flatten()
    eps = radii[first[rows]]
    if not torch.equal(adv_r[rows], eps.to(adv_r.dtype)):
        return "an adversarial example's radius is not the smallest radius its sample is broken at"
    bs = plan.cfg.batch_size  # x_adv is read in batches of rows (it may be spilled to a file)
    kept = (~has).nonzero().flatten()
    for i in range(0, kept.numel(), bs):
        idx = kept[i : i + bs]
        if not torch.equal(s.adv_rows(idx).to(plan.x.dtype), plan.x[idx.to(plan.device)].cpu()):
            return "an unbroken sample's stored example is not the sample"
    bad = 0
    for i in range(0, rows.numel(), bs):
        idx = rows[i : i + bs]
        idx_dev = idx.to(plan.device)
        ok = verify_adversarial(model, plan.x[idx_dev], s.adv_rows(idx).to(plan.device, plan.x.dtype), plan.y[idx_dev],
                                plan.norm, eps[i : i + bs].to(plan.device), batch_size=bs)
        bad += int((~ok).sum())
    if bad:
        return f"{bad} stored adversarial example(s) no longer fool the model inside their radius"
    return None


# ----------------------------------------------------------------------------- the sanity checks
class SanityState:
    """The resume state as :func:`robkd.auditing.stages.sanity` sees it: a check saved in the run's state is
    used first; else the one saved beside the model's cache entry, or by an identical model of this run
    (its flags then name this role). Every check saved goes to the state, this run's memory and, for a
    model whose entry is in the cache, the cache. Sanity flags are checked by their key (the check's
    settings and the suite's outcomes) and the entry's model key, not recomputed."""

    def __init__(self, state: Any, reuse: Reuse) -> None:
        self._state = state
        self._reuse = reuse
        self._memory: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:  # anything else of the StateStore
        if self._state is None:
            raise AttributeError(name)
        return getattr(self._state, name)

    def load_tensors(self, name: str) -> Any:
        return self._state.load_tensors(name) if self._state is not None else None

    def save_tensors(self, name: str, tensors: Any, meta: Any = None) -> None:
        if self._state is not None:
            self._state.save_tensors(name, tensors, meta)

    def load_json(self, name: str) -> Any:
        if self._state is not None:
            own = self._state.load_json(name)
            if own is not None:
                return own
        parsed = _sanity_name(name)
        if parsed is None:
            return None
        role, check = parsed
        reuse = self._reuse
        for source in (role, *[r for r in ROLES if r != role]):  # saved under this role's name first
            other = f"sanity-{source}-{check}"
            saved = self._memory.get(other) if reuse.keys[source] == reuse.keys[role] else None
            if saved is None and reuse.cache is not None and self._cached(role):  # the same model as the other role
                saved = reuse.cache.load_json(reuse.keys[role], other)
            if saved is not None:
                return _as_role(saved, source, role)
        return None

    def save_json(self, name: str, obj: Any) -> None:
        if self._state is not None:
            self._state.save_json(name, obj)
        self._memory[name] = copy.deepcopy(obj)
        parsed = _sanity_name(name)
        if parsed is not None and self._reuse.cache is not None and self._cached(parsed[0]):
            self._reuse.cache.save_json(self._reuse.keys[parsed[0]], name, obj)

    def _cached(self, role: str) -> bool:
        rec = self._reuse.records[role]
        return bool(rec.get("hit") or rec.get("stored"))


def _sanity_name(name: str) -> tuple[str, str] | None:
    for role in ROLES:
        if name.startswith(f"sanity-{role}-"):
            return role, name[len(f"sanity-{role}-"):]
    return None


def _as_role(saved: Any, source: str, role: str) -> Any:
    """A saved sanity unit of ``source`` as the unit of ``role`` (the flags' ``model`` renamed)."""
    out = json.loads(json.dumps(saved))
    if source != role and isinstance(out, dict) and isinstance(out.get("flags"), list):
        for f in out["flags"]:
            if isinstance(f, dict) and f.get("model") == source:
                f["model"] = role
    return out
