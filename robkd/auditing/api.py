"""Running an audit: validate everything, attack both models on identical samples, aggregate, judge.

Order of work (so that bad input never leaves a half-written output directory):

1. :func:`~robkd.auditing.plan.make_plan`: resolve both models, load the data and the seeded subset,
   check the pair and the data against each other, parse the radii, the attacks and the gates; only then
2. :func:`~robkd.auditing.store.audit_output`: lock and create the output directory (or pick up its saved
   state with ``resume``), and
3. :mod:`~robkd.auditing.stages`: per model, clean predictions, the attack suite (state saved after every
   finished (attack, radius)), optional certification; then the optional Proposition-2 terms on the pair,
   the sanity checks; :mod:`~robkd.auditing.aggregate`: the results; finally the gates.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from robkd.auditing import aggregate, robustness_stage, stages, transfer_stage
from robkd.auditing.config import AuditConfig
from robkd.auditing.judging import judge
from robkd.auditing.plan import ROLES, AuditPlan, make_plan
from robkd.auditing.reuse import Reuse, run_models
from robkd.auditing.result import RESULTS_FILE, SAMPLES_FILE, AuditResult, ResultsError, gate_samples, lookup_metric
from robkd.auditing.stages import EventFn, ModelOutcome
from robkd.auditing.store import STATE_DIR, StateStore, audit_output, check_out_dir
from robkd.errors import UsageError

log = logging.getLogger(__name__)


def audit(
    teacher: "str | Path | nn.Module",
    student: "str | Path | nn.Module",
    *,
    data: Any = None,
    data_dir: str | None = None,
    n: int | None = None,
    seed: int | None = None,
    eps: "Sequence[float] | str | float | None" = None,
    norm: str | None = None,
    attacks: "Sequence[str] | str | None" = None,
    out_dir: "str | Path | None" = None,
    gates: "Sequence[str] | None" = None,
    resume: bool = False,
    certify: str | None = None,
    llm: bool | None = None,
    **kw: Any,
) -> AuditResult:
    """Audit a teacher/student pair on identical samples; returns an :class:`AuditResult`.

    ``teacher``/``student`` are model files or loaded models (a plain ``nn.Module`` given with ``mean``/``std``
    is wrapped with that normalisation, as a model file without one would be; a robkd model whose metadata
    already says otherwise is refused). ``data`` is a dataset name or file, or in-memory data: ``(x, y)``
    tensors or arrays (images in [0,1] or uint8, ``(N, C, H, W)``; integer labels ``(N,)``), a
    ``torch.utils.data.Dataset`` of ``(image, label)`` pairs or a ``DataLoader`` (read as
    :func:`robkd.data.from_memory` describes: the same seeded subset of ``n`` samples as a file gives;
    ``results.json`` names the samples by their content hash). A setting left None takes its
    :class:`AuditConfig` default (``data`` fashion-mnist, ``n`` 1000, ``seed`` 0, ``norm`` Linf,
    ``attacks`` pgd-20, no gates); ``eps`` defaults to the dataset's usual radius. Further keywords: any
    :class:`AuditConfig` field (``split``, ``batch_size``, ``device``, ``gate_on``, ``strict``,
    ``llm_steps``, model-loading options ``arch``, ``teacher_arch``, ``student_arch``, ``mean``, ``std``,
    ``num_classes``, ``input_shape``, ``allow_pickle``...), plus ``overwrite`` (replace an existing audit
    in ``out_dir``), ``on_event`` (progress callback) and ``command`` (the command line to record). With
    ``out_dir`` the results are written there.
    """
    from robkd.data import IN_MEMORY, is_in_memory

    runtime = {k: kw.pop(k) for k in ("overwrite", "on_event", "command") if k in kw}
    memory = data if is_in_memory(data) else None
    if memory is not None:
        data = IN_MEMORY
    values: dict[str, Any] = dict(
        data=data, data_dir=data_dir, n=n, seed=seed, eps=eps, norm=norm,
        attacks=[attacks] if isinstance(attacks, str) else (list(attacks) if attacks is not None else None),
        gates=list(gates) if gates is not None else None, certify=certify, llm=llm,
        out=str(out_dir) if out_dir is not None else None,
    )
    values.update(kw)
    values = {k: plain_setting(k, v) for k, v in values.items()}
    for role, obj in (("teacher", teacher), ("student", student)):
        if isinstance(obj, (str, Path)):
            values[role] = str(obj)
    cfg = AuditConfig.from_spec(None, **values)
    return run_audit(
        cfg,
        teacher=None if isinstance(teacher, (str, Path)) else teacher,
        student=None if isinstance(student, (str, Path)) else student,
        data=memory,
        resume=resume,
        **runtime,
    )


def plain_setting(name: str, value: Any) -> Any:
    """A setting given as a tensor or array as plain numbers (``.tolist()``), so the config's checks see
    numbers and no error message ever shows a tensor; a large one is refused in one line."""
    if hasattr(value, "tolist") and hasattr(value, "shape") and not isinstance(value, (str, bytes)):
        shape = [int(v) for v in value.shape]
        count = 1
        for v in shape:
            count *= v
        if count > 64:
            raise UsageError(f"{name} must be a number, a string or a short list, got a {type(value).__name__} of "
                             f"shape {shape}")
        return value.tolist()
    if isinstance(value, (list, tuple)) and any(hasattr(v, "tolist") and hasattr(v, "shape") for v in value):
        return [plain_setting(name, v) for v in value]
    return value


def run_audit(
    cfg: AuditConfig,
    *,
    teacher: nn.Module | None = None,
    student: nn.Module | None = None,
    data: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    on_event: EventFn | None = None,
    command: Sequence[str] | None = None,
) -> AuditResult:
    """Run the audit described by ``cfg`` (models given here override ``cfg.teacher/student``, in-memory ``data``
    overrides ``cfg.data``); ``cfg``
    itself is left as it is (the resolved settings are the plan's, recorded in ``results.json``).

    Started by ``torchrun`` (``WORLD_SIZE`` > 1), every rank attacks a contiguous
    shard of the samples and keeps its own resume state under ``DIR/state/rank<k>/``;
    rank 0 gathers the shards and writes the same results a single process would
    (see docs/distributed.md). Ranks other than 0 return the result without
    per-sample tensors.
    """
    from robkd.distributed import check_same, init_from_env

    t_start = time.perf_counter()
    cfg = copy.deepcopy(cfg).validate()
    out = Path(cfg.out) if cfg.out else None
    if out is not None:  # cheap output checks before any model or data is loaded
        check_out_dir(out, resume=resume, overwrite=overwrite)
    ctx = init_from_env(cfg.device)
    plan = make_plan(cfg, teacher, student, ctx, data=data)
    if ctx.distributed:
        check_same(plan.fingerprint, "the models, data and settings", ctx)
        if plan.n < ctx.world_size:
            raise UsageError(f"{plan.n} samples cannot be shared by {ctx.world_size} processes: use more samples or fewer processes")
    if out is None:
        return _compute(plan, ctx, None, None, t_start=t_start, on_event=on_event, command=command)
    with audit_output(out, plan.fingerprint, ctx, resume=resume, overwrite=overwrite) as state:
        return _compute(plan, ctx, out, state, t_start=t_start, on_event=on_event, command=command)


def _compute(plan: AuditPlan, ctx: Any, out: Path | None, state: StateStore | None, *, t_start: float,
             on_event: EventFn | None, command: Sequence[str] | None) -> AuditResult:
    """The audit's computation once the plan is made and the output directory (if any) is ready."""
    from robkd.distributed import on_main, shard_positions

    timings: dict[str, Any] = {"prepare_s": time.perf_counter() - t_start}
    event: EventFn = on_event or (lambda kind, info: None)

    # ---- per rank: clean predictions, the attack suite and certification on this rank's shard
    pos = shard_positions(plan.n, ctx.rank, ctx.world_size)
    if ctx.distributed:
        pos_dev = pos.to(plan.device)
        x_s, y_s = plan.x[pos_dev], plan.y[pos_dev]
    else:
        x_s, y_s = plan.x, plan.y
    # identical models attacked once, cached blocks re-checked and reused (robkd.auditing.reuse)
    outcomes, reuse = run_models(plan, x_s, y_s, pos, state, event, distributed=ctx.distributed)
    if not ctx.distributed:
        return _finish(plan, outcomes, timings, t_start, event, command, out, state, reuse, distributed=None)

    # ---- rank 0: gather the shards, then aggregate, analyses on the whole set, gates, results.json
    whole = _gather(outcomes, pos, plan.n, ctx)
    holder: dict[str, AuditResult] = {}

    def finish_main() -> tuple[dict[str, Any], list[Any]]:
        dist = {**ctx.to_dict(), "sharding": "contiguous", "shard_state": f"{STATE_DIR}/rank<k>/"}
        result = _finish(plan, whole, timings, t_start, event, command, out, state, reuse, distributed=dist)
        holder["result"] = result
        return result.to_dict(), result.gates

    data, gate_results = on_main(finish_main, ctx)
    return holder["result"] if ctx.is_main else AuditResult(data, {}, gate_results)


def _add_extra(data: dict[str, Any], tensors: dict[str, Any], plan: AuditPlan, transfers: Any,
               own: dict[str, ModelOutcome], extra: dict[str, Any]) -> None:
    """The records of the optional stages (transfer attack, self-test, corruptions) into the results and tensors
    (docs/results-schema.md); the default verdict, judged before, does not read them."""
    if transfers is not None:
        data["cascade_order"] = [*plan.suite.order, "transfer"]  # the transfer attack runs last
        data["transfer_attack"], t = transfer_stage.records(plan, transfers, own)
        tensors.update(t)
    for role, rec in extra.get("self_test", {}).items():
        data[role]["self_test"] = rec
    if "corruption" in extra:
        records, ratios, t = extra["corruption"]
        for role, rec in records.items():
            data[role]["corruption"] = rec
        data["corruption_transfer"] = ratios
        tensors.update(t)


def _gather(outcomes: dict[str, ModelOutcome], pos: torch.Tensor, n: int, ctx: Any) -> dict[str, ModelOutcome]:
    """Rank 0: every rank's per-model outcomes merged into whole-set outcomes (other ranks: {})."""
    from robkd.distributed import gather_to_main

    parts = gather_to_main({"pos": pos, "outcomes": {role: o.cpu() for role, o in outcomes.items()}}, ctx)
    if parts is None:
        return {}
    positions = [p["pos"] for p in parts]
    return {role: stages.merge_outcomes([p["outcomes"][role] for p in parts], positions, n) for role in ROLES}


def _finish(plan: AuditPlan, outcomes: dict[str, ModelOutcome], timings: dict[str, Any], t_start: float,
            event: EventFn, command: Sequence[str] | None, out: Path | None, state: StateStore | None,
            reuse: Reuse, *, distributed: dict[str, Any] | None) -> AuditResult:
    """Whole-set analyses, aggregation, the gates and (with ``out``) the results files."""
    cfg = plan.cfg
    event("checkpoint", {"model": "both", "stage": "attacks"})  # every per-model stage is saved: --time-limit may stop here
    own = outcomes  # each model's own suite: what the sanity checks judge
    transfers = None
    if transfer_stage.enabled(plan):  # needs both suites: whole set, after the gather (robkd.auditing.transfer_stage)
        t0 = time.perf_counter()
        transfers = transfer_stage.run(plan, own, event)
        outcomes = transfer_stage.fold(plan, own, transfers)
        timings["transfer_attack_s"] = time.perf_counter() - t0
    non_finite: dict[str, Any] = {}
    for role in ROLES:
        twin = reuse.twin(role)
        non_finite[role] = (non_finite[twin] if twin is not None and transfers is None
                            else stages.count_non_finite(plan, outcomes[role]))
    prop2 = None
    if cfg.llm:
        t0 = time.perf_counter()
        prop2 = stages.prop2(plan, state, event)  # whole set, on rank 0 (not sharded: see docs/distributed.md)
        timings["llm_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    event("start", {"stage": "sanity checks (teacher and student)"})
    flags = stages.sanity(plan, {role: own[role].suite for role in ROLES}, reuse.sanity_state(state), event)
    event("done", {})
    timings["sanity_s"] = time.perf_counter() - t0
    flags = flags + stages.non_finite_flags(non_finite)
    extra: dict[str, Any] = {}
    if transfers is not None:
        flags = flags + transfer_stage.flags(plan, transfers)
    if cfg.self_test:
        t0 = time.perf_counter()
        extra["self_test"] = robustness_stage.self_test(plan, event)
        flags = flags + robustness_stage.self_test_flags(extra["self_test"])
        timings["self_test_s"] = time.perf_counter() - t0
    if cfg.corruptions:
        t0 = time.perf_counter()
        extra["corruption"] = robustness_stage.corruptions(plan, event)
        timings["corruption_s"] = time.perf_counter() - t0
    data, tensors = aggregate.results(plan, outcomes, non_finite, prop2, flags, timings, command=command,
                                      distributed=distributed)
    _add_extra(data, tensors, plan, transfers, own, extra)
    for role in ROLES:  # where each block came from (docs/results-schema.md: <role>.cache)
        data[role]["cache"] = dict(reuse.records[role])
    gate_results = [judge(g, lambda ref: lookup_metric(data, ref), on=cfg.gate_on, samples=gate_samples(data, tensors),
                          seed=cfg.seed) for g in plan.gates]
    data["gates"] = [r.to_dict() for r in gate_results]
    data["gates_passed"] = all(r.passed for r in gate_results)
    timings["total_s"] = time.perf_counter() - t_start
    result = AuditResult(data, tensors, gate_results)
    data["exit_code"] = result.exit_code
    if out is not None:
        try:
            result.write(out)
        except ResultsError as exc:  # the audit's own result breaks the schema: a robkd bug (exit 4), not bad input
            raise RuntimeError(f"the audit produced a result that breaks its own schema ({exc})") from exc
        log.info("wrote %s and %s", out / RESULTS_FILE, out / SAMPLES_FILE)
    return result
