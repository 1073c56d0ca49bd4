"""Running an audit: validate everything, attack both models on identical samples, aggregate, judge.

Order of work (so that bad input never leaves a half-written output directory):

1. resolve both models (paths are loaded; in-memory models are used as given), load the
   data and the seeded subset, check the pair and the data against each other, parse the
   radii, the attacks and the gates; only then
2. create the output directory (or pick up its saved state with ``resume``), and
3. per model: clean predictions, the attack :class:`~robkd.attacks.Suite` (state saved
   after every finished (attack, radius)), optional certification; then the optional
   Proposition-2 terms on the pair, the sanity checks, the aggregation and the gates.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from robkd.auditing.config import AuditConfig
from robkd.auditing.gates import Gate, judge, parse_gate, validate_gate
from robkd.auditing.result import RESULTS_FILE, SAMPLES_FILE, SCHEMA_VERSION, AuditResult, gate_samples, lookup_metric
from robkd.auditing.stats import CONFIDENCE, Proportion, ratio_interval
from robkd.errors import DataError, ModelLoadError, ModelRuntimeError, RobkdError, UnsupportedModelError, UsageError
from robkd.types import Norm, format_radius
from robkd.utils.logits import NON_FINITE, finite_rows, predict

log = logging.getLogger(__name__)

ROLES = ("teacher", "student")
STATE_DIR = "state"
#: ``DIR/state/layout.json``: the number of processes whose shards the saved state holds
LAYOUT_FILE = "layout.json"
#: progress events: ``on_event(kind, info)``; kinds: "start", "advance", "done" (see :class:`Progress`)
EventFn = Callable[[str, dict[str, Any]], None]


# ----------------------------------------------------------------------------- public API
def audit(
    teacher: "str | Path | nn.Module",
    student: "str | Path | nn.Module",
    *,
    data: str = "fashion-mnist",
    data_dir: str | None = None,
    n: int = 1000,
    seed: int = 0,
    eps: "Sequence[float] | str | float | None" = None,
    norm: str = "Linf",
    attacks: "Sequence[str] | str" = ("pgd-20",),
    out_dir: "str | Path | None" = None,
    gates: "Sequence[str]" = (),
    resume: bool = False,
    certify: str | None = None,
    llm: bool = False,
    **kw: Any,
) -> AuditResult:
    """Audit a teacher/student pair on identical samples; returns an :class:`AuditResult`.

    ``teacher``/``student`` are model files or loaded models. ``eps`` defaults to the
    dataset's usual radius. Further keywords: any :class:`AuditConfig` field (``split``,
    ``batch_size``, ``device``, ``gate_on``, ``strict``, ``llm_steps``, model-loading
    options ``arch``, ``teacher_arch``, ``student_arch``, ``mean``, ``std``,
    ``num_classes``, ``input_shape``, ``allow_pickle``...), plus ``overwrite`` (replace an
    existing audit in ``out_dir``), ``on_event`` (progress callback) and ``command``
    (the command line to record). With ``out_dir`` the results are written there.
    """
    runtime = {k: kw.pop(k) for k in ("overwrite", "on_event", "command") if k in kw}
    values: dict[str, Any] = dict(
        data=data, data_dir=data_dir, n=n, seed=seed, eps=eps, norm=norm,
        attacks=[attacks] if isinstance(attacks, str) else list(attacks),
        gates=list(gates), certify=certify, llm=llm,
        out=str(out_dir) if out_dir is not None else None,
    )
    values.update(kw)
    for role, obj in (("teacher", teacher), ("student", student)):
        if isinstance(obj, (str, Path)):
            values[role] = str(obj)
    cfg = AuditConfig.from_spec(None, **values)
    return run_audit(
        cfg,
        teacher=None if isinstance(teacher, (str, Path)) else teacher,
        student=None if isinstance(student, (str, Path)) else student,
        resume=resume,
        **runtime,
    )


def run_audit(
    cfg: AuditConfig,
    *,
    teacher: nn.Module | None = None,
    student: nn.Module | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_event: EventFn | None = None,
    command: Sequence[str] | None = None,
) -> AuditResult:
    """Run the audit described by ``cfg`` (models given here override ``cfg.teacher/student``).

    Started by ``torchrun`` (``WORLD_SIZE`` > 1), every rank attacks a contiguous
    shard of the samples and keeps its own resume state under ``DIR/state/rank<k>/``;
    rank 0 gathers the shards and writes the same results a single process would
    (see docs/distributed.md). Ranks other than 0 return the result without
    per-sample tensors.
    """
    from robkd.distributed import all_ranks, check_same, init_from_env, on_main

    t_start = time.perf_counter()
    cfg.validate()
    out = Path(cfg.out) if cfg.out else None
    if out is not None:  # cheap output checks before any model or data is loaded
        _check_out_dir(out, resume=resume, overwrite=overwrite)
    ctx = init_from_env(cfg.device)
    plan = _prepare(cfg, teacher, student, ctx)
    n = int(plan.y.shape[0])
    if ctx.distributed:
        check_same(plan.fingerprint, "the models, data and settings", ctx)
        if n < ctx.world_size:
            raise UsageError(f"{n} samples cannot be shared by {ctx.world_size} processes: use more samples or fewer processes")
    if out is None:
        return _audit_into(plan, ctx, None, None, t_start=t_start, on_event=on_event, command=command)
    from robkd.utils.outdir import OutDirLock

    existed = out.exists()
    lock = OutDirLock(out) if ctx.is_main else contextlib.nullcontext()
    with lock:  # a second writer to this --out is refused (rank 0 holds it for the whole job)
        root = out / STATE_DIR / f"rank{ctx.rank}" if ctx.distributed else out / STATE_DIR
        fp = {**plan.fingerprint, "world_size": ctx.world_size, "rank": ctx.rank} if ctx.distributed else plan.fingerprint
        state = _StateStore(root, fp)
        try:
            on_main(lambda: _prepare_out_dir(out, resume=resume, overwrite=overwrite, world_size=ctx.world_size), ctx)
            all_ranks(lambda: state.open(resume=resume), ctx)
            if ctx.is_main:
                from robkd.utils.io import atomic_write_json

                atomic_write_json(out / STATE_DIR / LAYOUT_FILE, {"world_size": ctx.world_size})
            return _audit_into(plan, ctx, out, state, t_start=t_start, on_event=on_event, command=command)
        except Exception:
            # a run refused or failed before it saved any progress leaves nothing behind; one with saved
            # attack progress keeps its state for --resume (as does an interrupt, which is not caught here)
            if ctx.is_main and not state.has_progress():
                _discard_new_state(out, existed=existed)
            raise


def _audit_into(plan: "_Plan", ctx: Any, out: Path | None, state: "_StateStore | None", *, t_start: float,
                on_event: EventFn | None, command: Sequence[str] | None) -> AuditResult:
    """The audit's computation once the plan is made and the output directory (if any) is ready."""
    from robkd.distributed import on_main, shard_positions

    cfg = plan.cfg
    n = int(plan.y.shape[0])
    timings: dict[str, Any] = {"prepare_s": time.perf_counter() - t_start}
    event = on_event or (lambda kind, info: None)

    # ---- per rank: clean predictions, the attack suite and certification on this rank's shard
    pos = shard_positions(n, ctx.rank, ctx.world_size)
    if ctx.distributed:
        pos_dev = pos.to(plan.device)
        x_s, y_s = plan.x[pos_dev], plan.y[pos_dev]
    else:
        x_s, y_s = plan.x, plan.y
    shard: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        model = plan.models[role]
        rt: dict[str, Any] = {}
        t0 = time.perf_counter()
        clean_pred = _predict(model, x_s, cfg.batch_size)
        rt["clean_s"] = time.perf_counter() - t0
        prior = state.load_suite(role) if state is not None else None
        resumed = [] if prior is None else [(role, a, r) for a, r in prior.done]
        t0 = time.perf_counter()
        sres = _run_suite(plan, role, model, x_s, y_s, pos, prior, state, event)
        rt["attacks_s"] = time.perf_counter() - t0
        rt["per_attack_s"] = {k: float(v) for k, v in (getattr(sres, "seconds", {}) or {}).items()}
        cert = None
        if cfg.certify:
            t0 = time.perf_counter()
            cert = _certify_compute(plan, role, model, x_s, y_s, state, event)
            rt["certify_s"] = time.perf_counter() - t0
        shard[role] = {"clean_pred": clean_pred, "suite": sres, "cert": cert, "rt": rt, "resumed": resumed}
    if ctx.distributed:
        shard = _gather_shards(shard, pos, n, ctx)

    # ---- rank 0: aggregate, analyses on the whole set, gates, results.json
    def finish() -> tuple[dict[str, Any], list[Any], AuditResult]:
        return _finish(plan, shard, timings, t_start, event, command, out, ctx, state)

    if not ctx.distributed:
        return finish()[2]
    holder: dict[str, AuditResult] = {}

    def finish_main() -> tuple[dict[str, Any], list[Any]]:
        data, gate_results, result = finish()
        holder["result"] = result
        return data, gate_results

    data, gate_results = on_main(finish_main, ctx)
    return holder["result"] if ctx.is_main else AuditResult(data, {}, gate_results)


def _gather_shards(shard: dict[str, dict[str, Any]], pos: torch.Tensor, n: int, ctx: Any) -> dict[str, dict[str, Any]]:
    """Rank 0: every rank's per-role outcomes merged into whole-set outcomes (other ranks: {})."""
    from robkd.distributed import concat_by_position, gather_to_main, merge_suite_results

    mine = {role: {**v, "suite": v["suite"].to_tensors()} for role, v in shard.items()}
    parts = gather_to_main({"pos": pos, "roles": mine}, ctx)
    if parts is None:
        return {}
    positions = [p["pos"] for p in parts]
    merged: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        rows = [p["roles"][role] for p in parts]
        rt: dict[str, Any] = {}
        for key in ("clean_s", "attacks_s", "certify_s"):
            vals = [r["rt"][key] for r in rows if key in r["rt"]]
            if vals:
                rt[key] = max(vals)  # wall clock: the slowest rank
        per_attack: dict[str, float] = {}
        for r in rows:
            for k, v in r["rt"].get("per_attack_s", {}).items():
                per_attack[k] = max(per_attack.get(k, 0.0), float(v))
        rt["per_attack_s"] = per_attack
        certs = [r["cert"] for r in rows]
        cert: Any = None
        if certs[0] is not None:
            unsupported = [c for c in certs if isinstance(c, dict)]
            if unsupported:
                cert = unsupported[0]
            else:
                cert = [
                    {k: (concat_by_position([c[i][k] for c in certs], positions, n) if k != "total_relus" else certs[0][i][k])
                     for k in certs[0][i]}
                    for i in range(len(certs[0]))
                ]
        merged[role] = {
            "clean_pred": concat_by_position([r["clean_pred"] for r in rows], positions, n),
            "suite": merge_suite_results([r["suite"] for r in rows], positions, n),
            "cert": cert,
            "rt": rt,
            # a pair counts as resumed when every shard picked it up from its saved state
            "resumed": sorted(set.intersection(*[{tuple(t) for t in r["resumed"]} for r in rows])),
        }
    return merged


def _finish(plan: "_Plan", shard: dict[str, dict[str, Any]], timings: dict[str, Any], t_start: float, event: EventFn,
            command: Sequence[str] | None, out: Path | None, ctx: Any,
            state: "_StateStore | None") -> tuple[dict[str, Any], list[Any], AuditResult]:
    """Aggregate the whole-set outcomes, run the whole-set analyses, judge the gates, write the results."""
    cfg = plan.cfg
    tensors: dict[str, torch.Tensor] = {
        "indices": plan.indices.clone(),
        "labels": plan.y.cpu().clone(),
        "radii": torch.tensor(plan.radii, dtype=torch.float64),
    }
    blocks: dict[str, dict[str, Any]] = {}
    suite_results: dict[str, Any] = {}
    resumed: list[str] = []
    for role in ROLES:
        s = shard[role]
        sres = s["suite"]
        resumed += [f"{role}:{a}@{format_radius(r)}" for (_, a, r) in sorted(s["resumed"], key=lambda t: (t[2], t[1]))]
        suite_results[role] = sres
        block = _model_block(role, plan, s["clean_pred"], sres, tensors)
        block["non_finite"] = _non_finite(plan, role, s["clean_pred"], sres)
        if cfg.certify:
            block["certification"] = _certify_summary(plan, role, s["cert"], block, tensors)
        block["timings"] = s["rt"]
        blocks[role] = block

    transfer = _transfer(plan, suite_results, tensors)
    prop2 = None
    if cfg.llm:
        t0 = time.perf_counter()
        prop2 = _prop2(plan, tensors, state, event)  # whole set, on rank 0 (not sharded: see docs/distributed.md)
        timings["llm_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    flags = _sanity(plan, suite_results, blocks)
    timings["sanity_s"] = time.perf_counter() - t0
    nf_flags = _non_finite_flags(blocks)
    if nf_flags:
        flags = (flags or []) + nf_flags

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
        "data": plan.data_info,
        "teacher": blocks["teacher"],
        "student": blocks["student"],
        "transfer": transfer,
        "prop2": prop2,
        "sanity": {"strict": cfg.strict, "checked": flags is not None, "attack_checks_n": cfg.sanity_n if flags is not None else 0,
                   "flags": flags or []},
        "gates": [],
        "gates_passed": True,
        "environment": _environment(),
        "resumed": resumed,
        "timings": timings,
    }
    if ctx.distributed:
        data["distributed"] = {**ctx.to_dict(), "sharding": "contiguous", "shard_state": f"{STATE_DIR}/rank<k>/"}
    results = [judge(g, lambda ref: lookup_metric(data, ref), on=cfg.gate_on, samples=gate_samples(data, tensors),
                     seed=cfg.seed) for g in plan.gates]
    data["gates"] = [r.to_dict() for r in results]
    data["gates_passed"] = all(r.passed for r in results)
    timings["total_s"] = time.perf_counter() - t_start
    result = AuditResult(data, tensors, results)
    data["exit_code"] = result.exit_code
    if out is not None:
        result.write(out)
        log.info("wrote %s and %s", out / RESULTS_FILE, out / SAMPLES_FILE)
    return data, results, result


# ----------------------------------------------------------------------------- preparation
class _Plan:
    """Everything validated before any output is written."""

    def __init__(self) -> None:
        self.models: dict[str, nn.Module] = {}
        self.model_info: dict[str, dict[str, Any]] = {}
        self.x: torch.Tensor
        self.y: torch.Tensor
        self.indices: torch.Tensor
        self.data_info: dict[str, Any] = {}
        self.radii: list[float] = []
        self.norm: Norm = Norm.LINF
        self.gates: list[Gate] = []
        self.suite: Any = None
        self.device: torch.device = torch.device("cpu")
        self.cfg: AuditConfig
        self.fingerprint: dict[str, Any] = {}


def _prepare(cfg: AuditConfig, teacher: nn.Module | None, student: nn.Module | None, ctx: Any = None) -> _Plan:
    from robkd.data import dataset_info, eval_subset, load_dataset

    plan = _Plan()
    plan.cfg = cfg
    plan.device = ctx.device if ctx is not None and ctx.distributed else _device(cfg.device)
    plan.norm = Norm.parse(cfg.norm)
    # radii: explicit, or the dataset's usual headline radius
    if cfg.eps is None:
        info = dataset_info(cfg.data)
        if info is None:
            raise UsageError(f"no radius given for dataset {cfg.data!r}: pass --eps (e.g. --eps 1/255,2/255,...,8/255)")
        cfg.eps = [float(info.default_eps)]
    plan.radii = [float(r) for r in cfg.eps]
    # gates (syntax first: cheapest check)
    plan.gates = [parse_gate(g) for g in cfg.gates]
    for g in plan.gates:
        validate_gate(g, radii=plan.radii, attacks=cfg.attacks, certified=cfg.certify is not None)
    # the attack suite validates the attack names
    from robkd.attacks import Suite

    plan.suite = Suite(list(cfg.attacks), plan.norm, seed=cfg.seed, batch_size=cfg.batch_size, progress=False)
    if cfg.certify:
        try:
            import robkd.bounds as _bounds  # noqa: F401

            getattr(_bounds, "certify")
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"--certify is not available in this installation ({exc})") from exc
    if cfg.strict and not _sanity_available():
        raise UsageError("--strict needs the evaluation sanity checks (robkd.analysis.sanity), which this installation lacks")
    if cfg.llm:
        try:
            from robkd.analysis.prop2 import prop2_terms  # noqa: F401
        except ImportError as exc:  # pragma: no cover - shipped with robkd
            raise UsageError(f"--llm is not available in this installation ({exc})") from exc
    # data first: its shape and classes complete plain state_dicts' architectures
    full = load_dataset(cfg.data, cfg.split, data_dir=cfg.data_dir, download=cfg.download, img_size=cfg.img_size)
    subset = eval_subset(full, cfg.n, cfg.seed)
    # models
    for role, given in (("teacher", teacher), ("student", student)):
        plan.models[role], plan.model_info[role] = _resolve_model(cfg, role, given, full)
    from robkd.models import check_compatible

    check_compatible(plan.models["teacher"], plan.models["student"])
    from robkd.analysis.sanity import BLACK_BOX

    needs_grad = bool(cfg.llm or any(a not in BLACK_BOX for a in cfg.attacks))
    for role in ROLES:
        _check_model_data(role, plan.models[role], subset, needs_grad=needs_grad)
    check_compatible(plan.models["teacher"], plan.models["student"])  # again, with filled metadata
    for role in ROLES:
        plan.models[role].to(plan.device).eval()
        plan.model_info[role]["meta"] = plan.models[role].meta.to_dict()
    plan.x = subset.float_x().to(plan.device)
    plan.y = subset.y.to(plan.device)
    plan.indices = subset.indices.to(torch.int64).cpu()
    idx_hash = hashlib.sha256(plan.indices.numpy().astype("<i8").tobytes()).hexdigest()
    plan.data_info = {
        "dataset": full.name,
        "requested": cfg.data,
        "split": cfg.split,
        "n": len(subset),
        "n_requested": cfg.n,
        "n_available": len(full),
        "seed": cfg.seed,
        "input_shape": list(subset.input_shape),
        "num_classes": int(plan.models["teacher"].meta.num_classes),
        "class_names": list(full.classes) if full.classes else None,
        "indices_sha256": idx_hash,
        "label_counts": torch.bincount(subset.y, minlength=int(plan.models["teacher"].meta.num_classes)).tolist(),
    }
    if len(subset) < cfg.n:
        log.warning("%s %s has only %d samples; auditing all of them (asked for %d)", full.name, cfg.split, len(subset), cfg.n)
    plan.fingerprint = {
        "schema_version": SCHEMA_VERSION,
        "teacher": plan.model_info["teacher"]["weights_sha256"],
        "student": plan.model_info["student"]["weights_sha256"],
        "indices_sha256": idx_hash,
        "dataset": full.name,
        "split": cfg.split,
        "seed": cfg.seed,
        "norm": plan.norm.value,
        "radii": plan.radii,
        "attacks": list(cfg.attacks),
        "certify": cfg.certify,
        "llm": cfg.llm,
        "llm_steps": cfg.llm_steps,
        "llm_restarts": cfg.llm_restarts,
        "linear_region_radius": cfg.linear_region_radius,
    }
    return plan


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"device {name!r} requested but MPS is not available (use --device cpu)")
    return dev


def _resolve_model(cfg: AuditConfig, role: str, given: nn.Module | None, data: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    from robkd.models import RobustModel, as_robust_model, load_model
    from robkd.utils.io import sha256_file

    info: dict[str, Any] = {"role": role}
    if given is not None:
        if not isinstance(given, nn.Module):
            raise UsageError(f"{role} must be a model file path or a torch.nn.Module, got {type(given).__name__}")
        model = given if isinstance(given, RobustModel) else as_robust_model(given)
        info["loaded_by_audit"] = False
        src = model.meta.source.get("path") if model.meta.source else None
        info["path"] = src
        if getattr(cfg, role) is None:
            setattr(cfg, role, src or f"<in-memory {type(model.net).__name__}>")
    else:
        path = getattr(cfg, role)
        if path is None:
            raise UsageError(f"no {role} model given")
        model = load_model(path, dataset=data, **cfg.model_kwargs(role, path))
        info["loaded_by_audit"] = True
        info["path"] = str(path)
        info["file_sha256"] = sha256_file(path)
    info["weights_sha256"] = weights_sha256(model)
    info["parameters"] = int(sum(p.numel() for p in model.parameters()))
    return model, info


def weights_sha256(model: nn.Module) -> str:
    """The model's identity hash (:func:`robkd.models.identity.model_sha256`)."""
    from robkd.models.identity import model_sha256

    return model_sha256(model)


def _check_model_data(role: str, model: nn.Module, data: Any, *, needs_grad: bool = True) -> None:
    meta = model.meta
    shape = tuple(data.input_shape)
    if meta.input_shape is None:
        meta.input_shape = shape
    elif tuple(meta.input_shape) != shape:
        raise DataError(f"the {role} takes inputs of shape {list(meta.input_shape)} but {data.name} images are {list(shape)}")
    probe = data.float_x(slice(0, 2)).to(_first_device(model))
    try:
        with torch.no_grad():
            out = model.eval()(probe)
    except Exception as exc:  # user models fail in many ways
        raise ModelLoadError(f"the {role} fails on {data.name} images of shape {list(shape)}: {exc}") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ModelLoadError(f"the {role} returns {getattr(out, 'shape', type(out).__name__)}; expected (batch, classes) logits")
    if out.shape[0] != probe.shape[0]:
        raise ModelRuntimeError(f"the {role} returns {out.shape[0]} row(s) of logits for a batch of {probe.shape[0]} "
                                "images; expected one row per image")
    if not out.dtype.is_floating_point:
        raise ModelRuntimeError(f"the {role} returns {str(out.dtype).replace('torch.', '')} outputs; robkd needs "
                                "floating-point logits (attacks and bounds differentiate them)")
    if needs_grad:
        _check_gradients(role, model, probe)
    k = int(out.shape[1])
    if meta.num_classes is None:
        meta.num_classes = k
    elif meta.num_classes != k:
        raise ModelLoadError(f"the {role}'s metadata says {meta.num_classes} classes but it outputs {k} logits")
    if data.classes and len(data.classes) != k:
        raise DataError(f"the {role} has {k} classes but {data.name} has {len(data.classes)}")
    if int(data.y.max()) >= k or int(data.y.min()) < 0:
        raise DataError(f"{data.name} labels span [{int(data.y.min())}, {int(data.y.max())}] but the {role} has {k} classes")


def _check_gradients(role: str, model: nn.Module, probe: torch.Tensor) -> None:
    """The attacks differentiate the model with respect to its input: a model that fails under gradients
    is refused here, before any output is written."""
    x = probe.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = model(x)
            (g,) = torch.autograd.grad(out.float().sum(), x, allow_unused=True)
    except Exception as exc:  # noqa: BLE001 - user models fail in many ways
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelRuntimeError(f"the {role} fails when differentiated with respect to its input ({first}); "
                                "gradient attacks need a differentiable model") from exc
    del g  # None (no gradient path) is allowed: the zero-gradients sanity flag reports it


def _first_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Refuse an unusable ``--out`` (side-effect free, before any model runs); True when it holds an audit."""
    from robkd.utils.outdir import check_out_dir

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    check_out_dir(out)
    has_audit = (out / RESULTS_FILE).exists() or (out / STATE_DIR).exists()
    if has_audit and not resume and not overwrite:
        raise UsageError(f"{out} already holds an audit: pass --resume to continue it, --overwrite to replace it, or choose another --out")
    return has_audit


def _discard_new_state(out: Path, *, existed: bool) -> None:
    """Remove what a failed fresh run created in ``out``: its state folder, and ``out`` itself if it was new."""
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    if not existed:
        from robkd.utils.outdir import LOCK_FILE

        with contextlib.suppress(OSError):
            remaining = [p for p in out.iterdir() if p.name != LOCK_FILE]
            if not remaining:
                shutil.rmtree(out, ignore_errors=True)


def _prepare_out_dir(out: Path, *, resume: bool, overwrite: bool, world_size: int = 1) -> None:
    has_audit = _check_out_dir(out, resume=resume, overwrite=overwrite)
    layout = out / STATE_DIR / LAYOUT_FILE
    if resume and layout.is_file():
        import json

        try:
            saved = int(json.loads(layout.read_text(encoding="utf-8"))["world_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"cannot read {layout}: {exc} (rerun with --overwrite)") from exc
        if saved != world_size:
            raise UsageError(
                f"the audit in {out} was run by {saved} process(es) and its resume state is kept per shard: "
                f"resume it with {saved} process(es) (--nproc-per-node {saved}), not {world_size}, or use --overwrite"
            )
    if has_audit and overwrite and not resume:
        for name in (RESULTS_FILE, SAMPLES_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {out}: {exc}") from exc


# ----------------------------------------------------------------------------- resume state
class _StateStore:
    """Per-(model, attack, radius) progress under ``DIR/state/``, written atomically."""

    def __init__(self, root: Path, fingerprint: dict[str, Any]) -> None:
        self.root = root
        self.fingerprint = fingerprint
        self.resuming = False

    def open(self, *, resume: bool) -> None:
        import json

        from robkd.utils.io import atomic_write_json

        fp_path = self.root / "fingerprint.json"
        if resume and fp_path.exists():
            try:
                saved = json.loads(fp_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot read saved audit state {fp_path}: {exc} (rerun with --overwrite)") from exc
            diff = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            if diff:
                raise UsageError(
                    f"cannot resume: the saved audit in {self.root.parent} differs in {', '.join(diff)} "
                    "(use the same models and settings, or --overwrite)"
                )
            self.resuming = True
            from robkd.utils.io import remove_stale_temps, remove_stale_temps_in

            remove_stale_temps_in(self.root)  # left by a kill during a state write
            out_dir = self.root.parent if self.root.name == STATE_DIR else self.root.parent.parent  # state/rank<k>/
            for name in (RESULTS_FILE, SAMPLES_FILE):
                remove_stale_temps(out_dir / name)
            log.info("resuming the audit saved in %s", self.root.parent)
        else:
            if resume:
                log.info("nothing to resume in %s: starting a new audit", self.root.parent)
            shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(fp_path, self.fingerprint)

    def has_progress(self) -> bool:
        """Whether the state holds saved work (attack, certification or analysis progress), not only its
        fingerprint."""
        try:
            return any(p.suffix == ".safetensors" or (p.suffix == ".json" and p.name != "fingerprint.json")
                       for p in self.root.iterdir())
        except OSError:
            return False

    def _tensor_path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
        from safetensors.torch import save

        from robkd.utils.io import atomic_write_bytes

        t = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        atomic_write_bytes(self._tensor_path(name), save(t, metadata=meta))

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        if not self.resuming:
            return None
        p = self._tensor_path(name)
        if not p.exists():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:  # noqa: BLE001 - a corrupt state file: recompute
            log.warning("ignoring unreadable audit state %s (%s)", p, exc)
            return None

    def save_json(self, name: str, obj: Any) -> None:
        from robkd.utils.io import atomic_write_json

        atomic_write_json(self.root / f"{name}.json", obj)

    def load_json(self, name: str) -> Any:
        import json

        p = self.root / f"{name}.json"
        if not self.resuming or not p.exists():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def load_suite(self, role: str) -> Any:
        from robkd.attacks import SuiteResult

        t = self.load_tensors(f"suite-{role}")
        if t is None:
            return None
        try:
            return SuiteResult.from_tensors(t)
        except RobkdError as exc:
            log.warning("ignoring unusable saved %s attack state (%s)", role, exc)
            return None


# ----------------------------------------------------------------------------- computation
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    preds = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            preds.append(predict(model(x[s : s + batch_size])))
    return torch.cat(preds).cpu()


def _run_suite(plan: _Plan, role: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor,
               prior: Any, state: _StateStore | None, event: EventFn) -> Any:
    """The attack suite on ``(x, y)`` whose rows are the samples ``sample_ids`` of the audit (random starts
    are seeded per sample id, so a shard gets the noise the whole-set run gives those samples)."""
    def on_progress(info: dict[str, Any]) -> None:
        event("progress", {"model": role, "stage": info.get("attack"), **info})

    def on_checkpoint(partial: Any) -> None:
        if state is not None:
            state.save_tensors(f"suite-{role}", partial.to_tensors())

    res = plan.suite.run(model, x, y, plan.radii, state=prior, on_progress=on_progress, on_checkpoint=on_checkpoint,
                         sample_ids=sample_ids)
    if state is not None:
        state.save_tensors(f"suite-{role}", res.to_tensors())
    return res


def _count(mask: torch.Tensor) -> int:
    return int(mask.sum().item())


def _model_block(role: str, plan: _Plan, clean_pred: torch.Tensor, sres: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    y = plan.y.cpu()
    n = int(y.shape[0])
    clean_correct = clean_pred == y
    suite_clean = sres.clean_correct.cpu().bool()
    if not torch.equal(suite_clean, clean_correct):
        log.warning("%s: %d samples changed their clean prediction between passes (non-deterministic model?)",
                    role, _count(suite_clean != clean_correct))
    robust = sres.robust.cpu().bool()
    broken_by = sres.broken_by.cpu().long()
    per_radius = []
    robust_after = sres.robust_after
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
    tensors[f"{role}.clean_pred"] = clean_pred.long()
    tensors[f"{role}.clean_correct"] = suite_clean
    tensors[f"{role}.broken_by"] = broken_by
    tensors[f"{role}.robust"] = robust
    for a in sres.order:
        tensors[f"{role}.robust_after.{a}"] = robust_after[a].cpu().bool()
    if getattr(sres, "x_adv", None) is not None:
        tensors[f"{role}.x_adv"] = sres.x_adv.detach().cpu().float()
    if getattr(sres, "adv_radius", None) is not None:
        tensors[f"{role}.adv_radius"] = sres.adv_radius.detach().cpu().double()
    return {
        "model": plan.model_info[role],
        "clean": Proportion.of(_count(clean_correct), n).to_dict(),
        "per_radius": per_radius,
        "rejected_adversarials": dict(getattr(sres, "rejected", {}) or {}),
        "certification": None,
    }


def _non_finite(plan: _Plan, role: str, clean_pred: torch.Tensor, sres: Any) -> dict[str, int]:
    """How many audited samples got a non-finite output (NaN or inf logit): on the clean input, and on the
    verified adversarial example the suite kept. Such samples are counted misclassified and not robust
    (robkd.utils.logits), whatever their label."""
    clean = _count(clean_pred == NON_FINITE)
    rows = torch.isfinite(sres.adv_radius.cpu().double()).nonzero().flatten()
    adv = 0
    if rows.numel():
        model = plan.models[role]
        bs = plan.cfg.batch_size
        with torch.no_grad():
            for s in range(0, rows.numel(), bs):
                xb = sres.x_adv[rows[s : s + bs]].to(plan.device, plan.x.dtype)
                adv += _count(~finite_rows(model(xb)).cpu())
    return {"clean": clean, "adversarial": adv}


def _non_finite_flags(blocks: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``non-finite-outputs`` sanity flag (fails under ``--strict``) of each model that produced one."""
    flags = []
    for role in ROLES:
        nf = blocks[role]["non_finite"]
        if nf["clean"] or nf["adversarial"]:
            flags.append({
                "code": "non-finite-outputs",
                "message": (f"the {role} returned NaN or infinite logits on {nf['clean']} clean input(s) and "
                            f"{nf['adversarial']} adversarial example(s); those samples count as misclassified"),
                "suggestion": "a broken or diverged model (check its weights and normalisation): do not ship it",
                "model": role,
                "value": float(nf["clean"] + nf["adversarial"]),
            })
    return flags


def _transfer(plan: _Plan, sres: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    n = int(plan.y.shape[0])
    rt_all = sres["teacher"].robust.cpu().bool()
    rs_all = sres["student"].robust.cpu().bool()
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
    tensors["transfer.lost"] = rt_all & ~rs_all
    tensors["transfer.gained"] = rs_all & ~rt_all
    return out


def _certify_compute(plan: _Plan, role: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     state: _StateStore | None, event: EventFn) -> "list[dict[str, torch.Tensor]] | dict[str, Any]":
    """Per-radius certification tensors for the rows ``(x, y)`` (saved for resume), or the "unsupported" record."""
    from robkd.bounds import certify

    method = plan.cfg.certify
    n = int(y.shape[0])
    bs = plan.cfg.batch_size
    out: list[dict[str, torch.Tensor]] = []
    for i, r in enumerate(plan.radii):
        name = f"certify-{role}-{i}"
        saved = state.load_tensors(name) if state is not None else None
        if saved is None:
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
                return {"status": "unsupported", "method": method, "reason": str(exc), "unsupported": list(exc.unsupported)}
            event("done", {"model": role})
            saved = {"certified": torch.cat(cert), "unstable": torch.cat(unstable), "linear_region": torch.cat(region),
                     "status": torch.tensor(status, dtype=torch.int8),
                     "total_relus": torch.tensor([total_relus if total_relus is not None else -1])}
            if state is not None:
                state.save_tensors(name, saved)
        out.append(saved)
    if plan.cfg.linear_region_radius:
        # radius-independent: computed once per model, repeated in every radius' record (shards merge per key)
        from robkd.bounds import linear_region_radius

        name = f"certify-{role}-lrradius"
        saved_lr = state.load_tensors(name) if state is not None else None
        if saved_lr is None:
            event("start", {"model": role, "stage": f"linear-region radius ({method})", "total": n})
            lr = [linear_region_radius(model, x[s : s + bs], norm=plan.norm, method=method, batch_size=bs)
                  for s in range(0, n, bs)]
            event("advance", {"model": role, "n": n})
            event("done", {"model": role})
            saved_lr = {"radius": torch.cat(lr).float().cpu()}
            if state is not None:
                state.save_tensors(name, saved_lr)
        for saved in out:
            saved["linear_region_radius"] = saved_lr["radius"]
    return out


def _certify_summary(plan: _Plan, role: str, computed: "list[dict[str, torch.Tensor]] | dict[str, Any]",
                     block: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The certification block of ``role`` from whole-set per-radius tensors (see :func:`_certify_compute`)."""
    if isinstance(computed, dict):
        return computed
    method = plan.cfg.certify
    n = int(plan.y.shape[0])
    cert_rows, unstable_rows, region_rows, per_radius = [], [], [], []
    for i, r in enumerate(plan.radii):
        saved = computed[i]
        total_relus = int(saved["total_relus"][0])
        c, u, lr = saved["certified"].bool(), saved["unstable"].long(), saved["linear_region"].bool()
        cert_rows.append(c)
        unstable_rows.append(u)
        region_rows.append(lr)
        cp = Proportion.of(_count(c), n)
        worst = block["per_radius"][i]["worst"]
        per_radius.append({
            "radius": r,
            "radius_text": format_radius(r),
            "certified": cp.to_dict(),
            "empirical": worst,
            "band": [cp.value, worst["value"]],
            "certified_but_broken": _count(c & ~tensors[f"{role}.robust"][i]),
            "falsified": _count(saved["status"] == 2),
            "unknown": _count(saved["status"] == 0),
            "linear_region_fraction": _count(lr) / n,
            "mean_unstable_relus": float(u.double().mean()),
            "total_relus": total_relus,
        })
    tensors[f"{role}.certified"] = torch.stack(cert_rows)
    tensors[f"{role}.unstable_relus"] = torch.stack(unstable_rows)
    tensors[f"{role}.linear_region"] = torch.stack(region_rows)
    block_out: dict[str, Any] = {"status": "ok", "method": method, "per_radius": per_radius}
    if plan.cfg.linear_region_radius and computed and "linear_region_radius" in computed[0]:
        from robkd.bounds import default_radius_cap, linear_region_radius_summary
        from robkd.bounds.api import default_radius_tol

        lr = computed[0]["linear_region_radius"].float()
        hi = default_radius_cap(plan.norm, int(plan.x[0].numel()))
        block_out["linear_region_radius"] = linear_region_radius_summary(
            lr, hi=hi, tol=default_radius_tol(hi), norm=plan.norm, method=method, per_sample=False)
        tensors[f"{role}.linear_region_radius"] = lr
    return block_out


def _prop2(plan: _Plan, tensors: dict[str, torch.Tensor], state: _StateStore | None, event: EventFn) -> dict[str, Any]:
    from robkd.analysis.prop2 import _TENSOR_FIELDS, prop2_terms

    per_radius = []
    rows: dict[str, list[torch.Tensor]] = {f: [] for f in _TENSOR_FIELDS}
    n = int(plan.y.shape[0])
    for i, r in enumerate(plan.radii):
        name = f"prop2-{i}"  # the settings are in the state fingerprint: a resume never mixes them
        saved_t = state.load_tensors(name) if state is not None else None
        saved_s = state.load_json(name) if state is not None else None
        if saved_t is None or saved_s is None:
            event("start", {"model": "pair", "stage": "prop2", "radius": r, "total": n})
            res = prop2_terms(plan.models["teacher"], plan.models["student"], plan.x, plan.y, r, norm=plan.norm,
                              steps=plan.cfg.llm_steps, restarts=plan.cfg.llm_restarts, seed=plan.cfg.seed,
                              batch_size=plan.cfg.batch_size)
            event("advance", {"model": "pair", "n": n})
            event("done", {"model": "pair"})
            saved_t = {f: getattr(res, f).detach().cpu() for f in _TENSOR_FIELDS}
            saved_s = _json_safe(res.summary())
            if state is not None:
                state.save_tensors(name, saved_t)
                state.save_json(name, saved_s)
        for f in _TENSOR_FIELDS:
            rows[f].append(saved_t[f])
        per_radius.append({"radius": r, "radius_text": format_radius(r), "summary": saved_s})
    for f, vals in rows.items():
        tensors[f"prop2.{f}"] = torch.stack(vals)
    return {"steps": plan.cfg.llm_steps, "per_radius": per_radius}


def _json_safe(obj: Any) -> Any:
    """Replace NaN/inf floats by None (results.json is strict JSON)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _sanity_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("robkd.analysis.sanity") is not None


def _sanity(plan: _Plan, sres: dict[str, Any], blocks: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Sanity flags of both models' evaluations; None when the checks are not installed."""
    if not _sanity_available():
        log.warning("robkd.analysis.sanity is not available: the evaluation was not sanity-checked")
        return None
    from robkd.analysis.sanity import run_sanity_checks

    eot = _eot_covers(plan.cfg.attacks, plan.norm)
    flags = []
    for role in ROLES:
        for f in run_sanity_checks(plan.models[role], plan.x, plan.y, result=sres[role], radii=plan.radii, norm=plan.norm,
                                   name=role, seed=plan.cfg.seed, extra=plan.cfg.sanity_n > 0,
                                   n=plan.cfg.sanity_n or 64,  # --sanity-n 0: the cheap checks keep 64 samples
                                   attacks=plan.cfg.attacks):
            d = f.to_dict()
            d.setdefault("model", role)
            if d.get("model") is None:
                d["model"] = role
            if d["code"] == "stochastic-outputs" and eot:
                d["handled_by"] = "EOT: every gradient attack of the suite averages its gradients over random passes"
            flags.append(d)
    return flags


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


def _environment() -> dict[str, Any]:
    try:
        from robkd.cli.env import collect

        return collect()
    except Exception as exc:  # noqa: BLE001 - the environment record must never break an audit
        return {"error": f"{type(exc).__name__}: {exc}", "python": sys.version.split()[0]}
