"""Python API: :func:`train` (a model from scratch) and :func:`repair` (distil a student from a teacher)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from robkd.distill.checks import chance_level_warning, nonfinite_tensors
from robkd.distill.config import STUDENT_METHODS, TrainConfig
from robkd.utils.validate import check_int
from robkd.distill.device import resolve_device
from robkd.distill.state import TrainLog
from robkd.distill.trainer import Trainer
from robkd.errors import OutputError, TrainingDivergedError, UsageError
from robkd.models.identity import model_sha256
from robkd.utils.io import remove_stale_temps, sha256_file
from robkd.utils.outdir import check_out_dir

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """The trained model, its training log, where it was saved and (for repair) the audit result.

    Unpacks as ``model, log = robkd.distill.train(...)``.
    """

    model: Any
    log: TrainLog
    checkpoint: Path | None = None
    audit: Any = None
    #: ``--method auto``: the trials, the choice and why (the result's ``auto`` block)
    auto: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.log))


def _file_sha256(source: Any) -> str | None:
    """SHA-256 of the bytes of a model file given by path (``None`` for a model passed in memory).

    A model's identity is :func:`robkd.models.identity.model_sha256`; this records which file it came from.
    """
    return sha256_file(source) if isinstance(source, (str, Path)) else None


def _load_data(data: Any, data_dir: Any, val_fraction: float, seed: int, train_n: int | None):
    from robkd.data import ImageData, dataset_info, eval_subset, load_dataset, train_val_split

    if isinstance(data, ImageData):
        full, name, info = data, data.name, dataset_info(data.name) if data.name else None
    elif isinstance(data, str) and data:
        full = load_dataset(data, "train", data_dir=data_dir)
        name, info = full.name, dataset_info(data)
    else:
        raise UsageError("data must be a dataset name (e.g. fashion-mnist) or an ImageData")
    tr, va = train_val_split(full, val_fraction, seed)
    if train_n is not None:
        check_int(train_n, "train_n", 1)  # named as the option it is, before the subset is drawn
        tr = eval_subset(tr, train_n, seed)
    return full, tr, va, name, info


def _load(model: Any, role: str, **kw: Any):
    from robkd.models import RobustModel, load_model

    if isinstance(model, RobustModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(model, **{k: v for k, v in kw.items() if v is not None})
    raise UsageError(f"{role} must be a path or a RobustModel, got {type(model).__name__}")


# ----------------------------------------------------------------------------- validation before training
def _output_paths(out: Any, state_path: Any, log_path: Any, audit_out: Any = None) -> tuple[Path | None, Path | None, Path | None]:
    """``(out, state, log)`` with the defaults ``OUT.state.pt`` / ``OUT.log.jsonl``, every one checked to be
    writable (and ``audit_out`` to be a directory that can be created) before anything runs."""
    out_p = Path(out) if out else None
    state_p = Path(state_path) if state_path else (out_p.with_name(out_p.name + ".state.pt") if out_p else None)
    log_p = Path(log_path) if log_path else (out_p.with_name(out_p.name + ".log.jsonl") if out_p else None)
    files = ((out_p, "output checkpoint", "model.safetensors"), (state_p, "training-state file", "train.state.pt"),
             (log_p, "log file", "train.log.jsonl"))
    named = [(p, what) for p, what, _ in files if p is not None]
    for p, what, example in files:
        if p is not None and p.is_dir():
            raise OutputError(f"the {what} {p} is a directory: give a file path (e.g. {p / example})")
        if p is not None:
            check_out_dir(p.parent)  # the folder of the file: an existing writable one, or one that can be made
    if audit_out is not None:
        a = check_out_dir(audit_out)
        named.append((a, "audit output directory"))
    seen: dict[Path, str] = {}
    for p, what in named:
        key = p.resolve()
        if key in seen:
            raise OutputError(f"the {seen[key]} and the {what} are the same path {p}: give them different paths")
        seen[key] = what
    return out_p, state_p, log_p


def _unrebuildable(meta: Any) -> str | None:
    """Why a model of ``meta`` cannot be rebuilt and saved as a robkd checkpoint (``None`` when it can)."""
    arch = meta.arch
    if not arch or arch in ("torchscript", "torch.export") or arch.startswith("pickle:"):
        return f"its architecture {arch!r} cannot be rebuilt by name"
    if meta.input_shape is None or meta.num_classes is None:
        return "its input shape or number of classes is unknown"
    return None


def _check_audit_settings(kw: Mapping[str, Any], data: Any) -> None:
    """Validate the audit options (radii, attack names, sample count, unknown keys) before any training."""
    try:
        from robkd.attacks import Suite
        from robkd.auditing.config import AuditConfig
        from robkd.auditing.gates import parse_gate
    except ImportError:  # no audit engine: _run_audit says so
        return
    values = dict(kw)
    attacks = values.pop("attacks", ["pgd-20"])
    name = data if isinstance(data, str) else getattr(data, "name", None)
    try:
        cfg = AuditConfig.from_spec(None, data=name, attacks=[attacks] if isinstance(attacks, str) else list(attacks), **values)
        Suite(list(cfg.attacks), cfg.norm, seed=cfg.seed, batch_size=cfg.batch_size, progress=False)
        for g in cfg.gates:
            parse_gate(g)
    except UsageError as exc:
        raise UsageError(f"bad audit setting: {exc}") from exc


# ----------------------------------------------------------------------------- training and saving
def _trainer(student, teacher, *, cfg: TrainConfig, tr, va, name, info, state_path, log_path, show_progress) -> Trainer:
    """The :class:`Trainer`; its set-up checks the options, labels, weights and outputs of both models."""
    return Trainer(student, cfg, tr, va, teacher, dataset=name, default_eps=info.default_eps if info else None,
                   state_path=state_path, log_path=log_path, show_progress=show_progress)


def _run(trainer: Trainer, teacher_src, *, tr, va, name, out_p: Path | None, resume, max_steps,
         extra_prov: Mapping[str, Any], fit: Any = None) -> TrainResult:
    """Train (holding the lock of ``out_p``), then save the model with its provenance."""
    from robkd.distributed import current

    import contextlib

    from robkd.utils.outdir import OutDirLock

    # rank 0 of a torchrun job writes the checkpoint (the process group may not be up yet: read RANK)
    is_main = current().is_main and int(os.environ.get("RANK", "0") or 0) == 0
    lock: Any = contextlib.nullcontext()
    if out_p is not None and is_main:
        # a second training run writing the same checkpoint (and its state file) is refused
        lock = OutDirLock(out_p.parent, what="--out", lock_name=f".{out_p.name}.lock")
    with lock:
        if out_p is not None and is_main:
            remove_stale_temps(out_p)  # left by a kill during an earlier save of this checkpoint
        fitted = None
        if fit is not None:  # --method auto: its trials and rounds run here, under the lock; fit() returns the kept run
            trainer, fitted, block = fit()
            extra_prov = {**extra_prov, "auto": {k: block[k] for k in ("chosen", "kept", "stopped", "elapsed_s", "budget_s")}}
        return _fit_and_save(trainer, teacher_src, tr=tr, va=va, name=name, out_p=out_p, resume=resume,
                             max_steps=max_steps, extra_prov=extra_prov, fitted=fitted)


def _fit_and_save(trainer: Trainer, teacher_src, *, tr, va, name, out_p: Path | None, resume, max_steps,
                  extra_prov: Mapping[str, Any], fitted: TrainLog | None = None) -> TrainResult:
    from robkd import __version__
    from robkd.distributed import barrier, current
    from robkd.models import save_model

    student, teacher = trainer.student, trainer.teacher
    tlog = fitted if fitted is not None else trainer.fit(resume=resume, max_steps=max_steps)
    if not tlog.finished:
        return TrainResult(student, tlog, None)
    bad = nonfinite_tensors(student)
    if bad:  # the trainer stops on the first non-finite step; this keeps a NaN/inf model off the disk whatever happened
        raise TrainingDivergedError(f"the trained model has non-finite weights ({', '.join(bad[:3])}): no model was saved; "
                                    f"lower the learning rate (--lr) and train again")
    stuck = chance_level_warning(tlog.records, student.meta.num_classes)
    if stuck is not None:  # saved all the same (the user may want it), but never silently
        log.warning("%s", stuck)
    rc = trainer.config
    prov = {
        "method": rc.method,
        "hyperparameters": rc.to_dict(),
        "augment": trainer.augment,
        "teacher_sha256": trainer.identity()["teacher_sha256"],  # the audit's weights_sha256 of the same teacher
        "teacher_file_sha256": _file_sha256(teacher_src) if teacher is not None else None,
        "teacher": str(teacher_src) if isinstance(teacher_src, (str, Path)) else (None if teacher is None else "in-memory"),
        "data": name,
        "train_samples": len(tr),
        "val_samples": len(va),
        "seed": rc.seed,
        "epochs": rc.epochs,  # nominal epochs, as asked for
        "passes": rc.passes,  # passes over the data actually made (Fast-ARD: ceil(epochs / replays))
        "selected_epoch": tlog.selected_epoch,
        "select": rc.select,
        "device": trainer.device.type,
        "robkd_version": __version__,
        **dict(extra_prov),
    }
    if tlog.records and "val_robust" in tlog.records[-1]:
        sel = tlog.selected_epoch or len(tlog.records)
        r = tlog.records[sel - 1]
        prov["val_clean"], prov["val_robust"] = r.get("val_clean"), r.get("val_robust")
    student.meta.provenance = {}
    if student.meta.dataset is None:
        student.meta.dataset = name
    if current().distributed:
        prov["world_size"] = current().world_size
    if out_p is not None:
        if current().is_main:  # under torchrun rank 0 writes the checkpoint
            save_model(student, out_p, provenance=prov)
        else:
            student.meta.provenance = prov
        student.meta.source = {"path": str(out_p), "format": "robkd"}  # what reports show: the new file
        barrier()
    else:
        student.meta.provenance = prov
    return TrainResult(student, tlog, out_p)


def train(
    method: str = "st",
    arch: str = "robkd:cnn_small",
    data: Any = "fashion-mnist",
    epochs: int = 10,
    out: str | Path | None = None,
    *,
    teacher: Any = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    data_dir: str | Path | None = None,
    state_path: str | Path | None = None,
    log_path: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    max_steps: int | None = None,
    **hparams: Any,
) -> TrainResult:
    """Train a fresh ``arch`` model with ``method`` on the train split of ``data``; save it to ``out``.

    ``hparams`` are :class:`robkd.distill.TrainConfig` fields (unknown keys
    raise :class:`UsageError`), e.g. ``device="cuda"`` (default ``cpu``; the
    returned model stays on that device, the saved file holds CPU tensors).
    Distillation methods need ``teacher`` (path or RobustModel). The training state goes to ``<out>.state.pt`` and the epoch
    log to ``<out>.log.jsonl`` unless given. Returns :class:`TrainResult`
    (unpacks as ``model, log``).
    """
    from robkd.models import build_model
    from robkd.utils.seed import seed_everything

    cfg = TrainConfig.from_dict({"method": method, "epochs": epochs, **hparams})
    resolve_device(cfg.device)  # an unavailable device fails before the data is loaded
    out_p, state_p, log_p = _output_paths(out, state_path, log_path)
    full, tr, va, name, info = _load_data(data, data_dir, cfg.val_fraction, cfg.seed, cfg.train_n)
    t = _load(teacher, "teacher", dataset=full) if teacher is not None else None
    seed_everything(cfg.seed)
    mean = full.mean if full.mean is not None else None
    std = full.std if full.std is not None else None
    # the classes: the dataset's when it declares them, else a teacher's, else max label + 1
    k = (info.num_classes if info and info.num_classes else len(full.classes) if full.classes
         else t.meta.num_classes if t is not None and t.meta.num_classes else full.num_classes)
    student = build_model(arch, input_shape=full.input_shape, num_classes=k, mean=mean, std=std, dataset=name,
                          arch_kwargs=arch_kwargs)
    trainer = _trainer(student, t, cfg=cfg, tr=tr, va=va, name=name, info=info, state_path=state_p, log_path=log_p,
                       show_progress=show_progress)
    return _run(trainer, teacher, tr=tr, va=va, name=name, out_p=out_p, resume=resume, max_steps=max_steps,
                extra_prov={"student_init": "scratch", "arch": arch})


def repair(
    teacher: Any,
    student: Any = None,
    *,
    method: str = "kdiga",
    data: Any = "fashion-mnist",
    epochs: int = 10,
    out: str | Path | None = None,
    from_scratch: bool = False,
    student_arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
    data_dir: str | Path | None = None,
    state_path: str | Path | None = None,
    log_path: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    max_steps: int | None = None,
    audit: bool = False,
    audit_out: str | Path | None = None,
    audit_kwargs: Mapping[str, Any] | None = None,
    audit_before: bool = True,
    gate: "Sequence[str] | str | None" = None,
    budget: Any = None,
    auto_options: Mapping[str, Any] | None = None,
    **hparams: Any,
) -> TrainResult:
    """Distil ``teacher`` into ``student`` with a robust-distillation ``method`` (default KDIGA).

    ``method="auto"`` (:mod:`robkd.distill.auto`) tries candidate methods and weights (``auto_options``) on a
    validation split and continues the best until ``gate`` holds on validation or ``budget`` (e.g. ``"2h"``)
    is spent; the result's ``auto`` block (also ``TrainResult.auto``) holds the trial table. ``gate`` is also
    judged by the final audit.

    ``student`` (path or RobustModel) is fine-tuned; ``from_scratch=True``
    re-initialises it (same architecture); with ``student=None`` a new student
    of ``student_arch`` is created. ``audit=True`` then runs
    :func:`robkd.auditing.audit` on (teacher, new student) with ``audit_kwargs``
    (e.g. ``n``, ``eps``, ``attacks``), writes results.json, the report and the
    training log to ``audit_out`` when given, and stores the result in
    ``TrainResult.audit``. With ``audit_before`` (default) and a given
    ``student``, the student as given is audited first with the same settings;
    that audit becomes the result's ``before`` block (``kind`` ``robkd-repair``)
    and the report's before/after comparison. Training runs on ``device``
    (a :class:`TrainConfig` field in ``hparams``, default ``cpu``); both audits use
    the same device unless ``audit_kwargs`` names another.
    """
    from robkd.models import build_model, check_compatible
    from robkd.utils.seed import seed_everything

    auto_opts = None
    if method == "auto":
        from robkd.distill.auto import AutoOptions

        auto_opts = AutoOptions.build(gate, budget, auto_options)
        method = "kd"  # the base config: the candidates set the objective
    elif budget is not None or auto_options:
        raise UsageError("--budget and the auto options belong to --method auto")
    cfg = TrainConfig.from_dict({"method": method, "epochs": epochs, **hparams})
    if cfg.method not in STUDENT_METHODS:
        raise UsageError(f"repair distils a student: method must be one of {', '.join(STUDENT_METHODS)}, got {cfg.method!r}")
    dev = resolve_device(cfg.device)  # an unavailable device fails before the data is loaded
    akw = dict(audit_kwargs or {})
    if gate:  # judged by the final audit as well
        akw.setdefault("gates", [gate] if isinstance(gate, str) else list(gate))
    akw.setdefault("device", str(dev))  # the audits run where the training did
    out_p, state_p, log_p = _output_paths(out, state_path, log_path, audit_out if audit else None)
    if audit:
        _check_audit_settings(akw, data)
    full, tr, va, name, info = _load_data(data, data_dir, cfg.val_fraction, cfg.seed, cfg.train_n)
    t = _load(teacher, "teacher", dataset=full)
    seed_everything(cfg.seed)
    if student is None:
        if not student_arch:
            raise UsageError("give a student model, or --student-arch to create a new one")
        s = build_model(student_arch, input_shape=t.meta.input_shape or full.input_shape, num_classes=t.meta.num_classes or full.num_classes,
                        mean=t.meta.mean or full.mean, std=t.meta.std or full.std, dataset=name, arch_kwargs=arch_kwargs)
        init = f"new {student_arch}"
    else:
        lk = dict(load_kwargs or {})
        if lk.get("arch"):  # a plain state_dict: its shape and classes are the teacher's
            lk.setdefault("input_shape", t.meta.input_shape)
            lk.setdefault("num_classes", t.meta.num_classes)
        s = _load(student, "student", **lk)
        init = {"from": str(student) if isinstance(student, (str, Path)) else "in-memory", "sha256": model_sha256(s)}
        if isinstance(student, (str, Path)):
            init["file_sha256"] = _file_sha256(student)
        if from_scratch:
            if _unrebuildable(s.meta):
                raise UsageError(f"--from-scratch needs a student of a named architecture, not {s.meta.arch!r}")
            s = build_model(s.meta.arch, input_shape=s.meta.input_shape or full.input_shape, num_classes=s.meta.num_classes or full.num_classes,
                            mean=s.meta.mean, std=s.meta.std, dataset=s.meta.dataset or name, arch_kwargs=s.meta.arch_kwargs)
            init = {"re-initialised": init}
    check_compatible(t, s)
    why = _unrebuildable(s.meta) if out_p is not None else None
    if why:  # refused now, not after the training
        raise UsageError(f"cannot save the repaired student to {out_p} as a robkd checkpoint: {why}; give the student "
                         f"as a state_dict with --student-arch, or train a new one with --student-arch alone")
    trainer = _trainer(s, t, cfg=cfg, tr=tr, va=va, name=name, info=info, state_path=state_p, log_path=log_p,
                       show_progress=show_progress)
    before = None
    if audit and audit_before and student is not None:  # the pre-repair student, for the before/after comparison
        log.info("auditing the student before the repair")
        before = _run_audit(t, _load(student, "student", **dict(load_kwargs or {})) if from_scratch else s, data, data_dir,
                            dict(akw), None, show_progress=show_progress)
    fit, blocks = None, []
    if auto_opts is not None:
        if max_steps is not None:
            raise UsageError("max_steps (a simulated kill) is not supported with --method auto")
        from robkd.distill.auto import run_auto

        def fit():
            out = run_auto(s, t, base=trainer.config, tr=tr, va=va, opts=auto_opts, dataset=name,
                           default_eps=info.default_eps if info else None, resume=resume, show_progress=show_progress,
                           state_dir=state_p.with_name(state_p.name + ".auto") if state_p is not None else None)
            blocks.append(out[2])
            return out

    res = _run(trainer, teacher, tr=tr, va=va, name=name, out_p=out_p, resume=resume, max_steps=max_steps,
               extra_prov={"student_init": init}, fit=fit)
    res.auto = blocks[0] if blocks else None
    if audit and res.log.finished:
        res.audit = _audit(t, res.model, data, data_dir, res.log, audit_out, dict(akw), before, res.auto,
                           show_progress=show_progress)
    return res


def _run_audit(teacher: Any, student: Any, data: Any, data_dir: Any, kw: dict[str, Any], out_dir: Any, *,
               show_progress: bool = False) -> Any:
    """The audit of a repair (``show_progress``: its phases as progress bars on a terminal, lines in CI)."""
    try:
        from robkd.auditing import audit as run_audit
    except ImportError as exc:
        raise UsageError(f"the audit engine is not available in this installation ({exc}): repair with audit disabled") from exc
    name = data if isinstance(data, str) else getattr(data, "name", "fashion-mnist")
    kw.setdefault("data_dir", data_dir)
    if out_dir is not None:
        kw.setdefault("overwrite", True)
    if not show_progress or "on_event" in kw:
        return run_audit(teacher, student, data=name, out_dir=out_dir, **kw)  # sharded under torchrun
    from robkd.auditing.events import EventDisplay
    from robkd.utils.progress import progress_bar

    with progress_bar() as progress:
        return run_audit(teacher, student, data=name, out_dir=out_dir, on_event=EventDisplay(progress), **kw)


def _audit(teacher: Any, student: Any, data: Any, data_dir: Any, tlog: TrainLog, out_dir: Any, kw: dict[str, Any],
           before: Any = None, auto: dict[str, Any] | None = None, *, show_progress: bool = False) -> Any:
    """Audit (teacher, repaired student); with ``out_dir`` write results.json, the report and the training log.

    ``before`` (the audit of the student before the repair) goes into the result as ``before``.
    """
    result = _run_audit(teacher, student, data, data_dir, kw, out_dir, show_progress=show_progress)
    from robkd.distributed import current

    if before is not None:
        result.attach_before(before)
    if auto is not None:  # --method auto: the trial table, beside the audit's figures (the schema allows extra blocks)
        result.attach_auto(auto)
    if out_dir is not None and current().is_main:
        from robkd.utils.io import atomic_write_json, atomic_write_text

        if before is not None or auto is not None:
            result.write(out_dir, samples=False)  # results.json again, now with the before / auto blocks
        if auto is not None:
            from robkd.distill.auto import auto_table

            atomic_write_text(Path(out_dir) / "auto.md", auto_table(auto))
        atomic_write_json(Path(out_dir) / "training_log.json", tlog.to_dict())
        try:
            from robkd.report import render
        except ImportError:  # report renderer not installed: results.json is still there
            log.warning("robkd.report is not available: wrote results.json only")
        else:
            render(result.to_dict(), out_dir)
    return result
