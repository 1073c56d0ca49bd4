"""Python API: :func:`train` (a model from scratch) and :func:`repair` (distil a student from a teacher)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from robkd.distill.config import STUDENT_METHODS, TrainConfig
from robkd.distill.trainer import Trainer, TrainLog, resolve_device
from robkd.errors import UsageError

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

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.log))


def model_sha256(model_or_path: Any) -> str:
    """SHA-256 of a model file's bytes, or of a module's state_dict (names, shapes, bytes) in key order."""
    if isinstance(model_or_path, (str, Path)):
        from robkd.utils.io import sha256_file

        return sha256_file(model_or_path)
    h = hashlib.sha256()
    for k, v in sorted(model_or_path.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


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
        tr = eval_subset(tr, train_n, seed)
    return full, tr, va, name, info


def _load(model: Any, role: str, **kw: Any):
    from robkd.models import RobustModel, load_model

    if isinstance(model, RobustModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(model, **{k: v for k, v in kw.items() if v is not None})
    raise UsageError(f"{role} must be a path or a RobustModel, got {type(model).__name__}")


def _run(student, teacher, teacher_src, *, cfg: TrainConfig, full, tr, va, name, info, out, state_path, log_path,
         resume, show_progress, max_steps, extra_prov: Mapping[str, Any]) -> TrainResult:
    from robkd import __version__
    from robkd.models import save_model

    out_p = Path(out) if out else None
    if state_path is None and out_p is not None:
        state_path = out_p.with_name(out_p.name + ".state.pt")
    if log_path is None and out_p is not None:
        log_path = out_p.with_name(out_p.name + ".log.jsonl")
    trainer = Trainer(student, cfg, tr, va, teacher, dataset=name, default_eps=info.default_eps if info else None,
                      state_path=state_path, log_path=log_path, show_progress=show_progress)
    tlog = trainer.fit(resume=resume, max_steps=max_steps)
    if not tlog.finished:
        return TrainResult(student, tlog, None)
    rc = trainer.config
    prov = {
        "method": rc.method,
        "hyperparameters": rc.to_dict(),
        "augment": trainer.augment,
        "teacher_sha256": model_sha256(teacher_src) if teacher is not None else None,
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
    from robkd.distributed import barrier, current

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
    full, tr, va, name, info = _load_data(data, data_dir, cfg.val_fraction, cfg.seed, cfg.train_n)
    t = _load(teacher, "teacher", dataset=full) if teacher is not None else None
    seed_everything(cfg.seed)
    mean = full.mean if full.mean is not None else None
    std = full.std if full.std is not None else None
    student = build_model(arch, input_shape=full.input_shape, num_classes=info.num_classes if info and info.num_classes else full.num_classes,
                          mean=mean, std=std, dataset=name, arch_kwargs=arch_kwargs)
    return _run(student, t, teacher, cfg=cfg, full=full, tr=tr, va=va, name=name, info=info, out=out, state_path=state_path,
                log_path=log_path, resume=resume, show_progress=show_progress, max_steps=max_steps,
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
    **hparams: Any,
) -> TrainResult:
    """Distil ``teacher`` into ``student`` with a robust-distillation ``method`` (default KDIGA).

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

    cfg = TrainConfig.from_dict({"method": method, "epochs": epochs, **hparams})
    if cfg.method not in STUDENT_METHODS:
        raise UsageError(f"repair distils a student: method must be one of {', '.join(STUDENT_METHODS)}, got {cfg.method!r}")
    dev = resolve_device(cfg.device)  # an unavailable device fails before the data is loaded
    akw = dict(audit_kwargs or {})
    akw.setdefault("device", str(dev))  # the audits run where the training did
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
        init = {"from": str(student) if isinstance(student, (str, Path)) else "in-memory", "sha256": model_sha256(student)}
        if from_scratch:
            if not s.meta.arch or s.meta.arch in ("torchscript", "torch.export") or s.meta.arch.startswith("pickle:"):
                raise UsageError(f"--from-scratch needs a student of a named architecture, not {s.meta.arch!r}")
            s = build_model(s.meta.arch, input_shape=s.meta.input_shape or full.input_shape, num_classes=s.meta.num_classes or full.num_classes,
                            mean=s.meta.mean, std=s.meta.std, dataset=s.meta.dataset or name, arch_kwargs=s.meta.arch_kwargs)
            init = {"re-initialised": init}
    check_compatible(t, s)
    before = None
    if audit and audit_before and student is not None:  # the pre-repair student, for the before/after comparison
        log.info("auditing the student before the repair")
        before = _run_audit(t, _load(student, "student", **dict(load_kwargs or {})) if from_scratch else s, data, data_dir,
                            dict(akw), None)
    res = _run(s, t, teacher, cfg=cfg, full=full, tr=tr, va=va, name=name, info=info, out=out, state_path=state_path,
               log_path=log_path, resume=resume, show_progress=show_progress, max_steps=max_steps,
               extra_prov={"student_init": init})
    if audit and res.log.finished:
        res.audit = _audit(t, res.model, data, data_dir, res.log, audit_out, dict(akw), before)
    return res


def _run_audit(teacher: Any, student: Any, data: Any, data_dir: Any, kw: dict[str, Any], out_dir: Any) -> Any:
    try:
        from robkd.auditing import audit as run_audit
    except ImportError as exc:
        raise UsageError(f"the audit engine is not available in this installation ({exc}): repair with audit disabled") from exc
    name = data if isinstance(data, str) else getattr(data, "name", "fashion-mnist")
    kw.setdefault("data_dir", data_dir)
    if out_dir is not None:
        kw.setdefault("overwrite", True)
    return run_audit(teacher, student, data=name, out_dir=out_dir, **kw)  # sharded under torchrun


def _audit(teacher: Any, student: Any, data: Any, data_dir: Any, tlog: TrainLog, out_dir: Any, kw: dict[str, Any],
           before: Any = None) -> Any:
    """Audit (teacher, repaired student); with ``out_dir`` write results.json, the report and the training log.

    ``before`` (the audit of the student before the repair) goes into the result as ``before``.
    """
    result = _run_audit(teacher, student, data, data_dir, kw, out_dir)
    from robkd.distributed import current

    if before is not None:
        result.attach_before(before)
    if out_dir is not None and current().is_main:
        from robkd.utils.io import atomic_write_json

        if before is not None:
            result.write(out_dir, samples=False)  # results.json again, now with the before block
        atomic_write_json(Path(out_dir) / "training_log.json", tlog.to_dict())
        try:
            from robkd.report import render
        except ImportError:  # report renderer not installed: results.json is still there
            log.warning("robkd.report is not available: wrote results.json only")
        else:
            render(result.to_dict(), out_dir)
    return result
