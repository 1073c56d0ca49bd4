"""The audit plan: everything checked and resolved before any output is written, as one frozen object.

:func:`make_plan` resolves both models (paths are loaded; in-memory models are used as given), loads the
data and its seeded subset, checks the pair and the data against each other (shapes, classes, a forward
and a backward pass), parses the radii, the attacks and the gates, and fills in what the caller's
:class:`~robkd.auditing.config.AuditConfig` left open (the dataset's radius, the names of in-memory
models) in a copy: the caller's config is never changed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import types
from typing import Any, Mapping

import torch
from torch import nn

from robkd.auditing.config import AuditConfig
from robkd.auditing.gates import Gate, parse_gate, validate_gate
from robkd.auditing.result import SCHEMA_VERSION
from robkd.errors import DataError, ModelLoadError, ModelRuntimeError, UsageError
from robkd.types import Norm
from robkd.utils.device import parse_device
from robkd.utils.modules import model_device

log = logging.getLogger(__name__)

ROLES = ("teacher", "student")


@dataclasses.dataclass(frozen=True)
class AuditPlan:
    """What an audit runs on, fixed before any output is written.

    ``cfg`` is the resolved configuration (``eps`` filled with the dataset's radius when it was not
    given, ``teacher``/``student`` named for in-memory models): ``results.json`` records it under
    ``config``. ``models`` and ``model_info`` are keyed by role (``teacher``, ``student``).
    """

    cfg: AuditConfig
    models: Mapping[str, nn.Module]
    model_info: Mapping[str, Mapping[str, Any]]
    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor
    data_info: Mapping[str, Any]
    radii: tuple[float, ...]
    norm: Norm
    gates: tuple[Gate, ...]
    suite: Any  # robkd.attacks.Suite
    device: torch.device
    fingerprint: Mapping[str, Any]

    @property
    def n(self) -> int:
        """Number of audited samples."""
        return int(self.y.shape[0])


def make_plan(cfg: AuditConfig, teacher: nn.Module | None = None, student: nn.Module | None = None,
              ctx: Any = None) -> AuditPlan:
    """Validate and resolve everything an audit needs (raises a :class:`~robkd.errors.RobkdError` on bad
    input); ``teacher``/``student`` given here override ``cfg.teacher/student``; ``ctx`` is the
    :class:`~robkd.distributed.DistContext` (its device wins under torchrun)."""
    from robkd.analysis.sanity import BLACK_BOX
    from robkd.attacks import Suite
    from robkd.data import dataset_info, eval_subset, load_dataset
    from robkd.models import check_compatible

    cfg = copy.deepcopy(cfg).validate()
    device = ctx.device if ctx is not None and ctx.distributed else parse_device(cfg.device)
    norm = Norm.parse(cfg.norm)
    if cfg.eps is None:  # the dataset's usual headline radius
        info = dataset_info(cfg.data)
        if info is None:
            raise UsageError(f"no radius given for dataset {cfg.data!r}: pass --eps (e.g. --eps 1/255,2/255,...,8/255)")
        cfg.eps = [float(info.default_eps)]
    radii = tuple(float(r) for r in cfg.eps)
    # gates (syntax first: cheapest check)
    gates = tuple(parse_gate(g) for g in cfg.gates)
    for g in gates:
        validate_gate(g, radii=radii, attacks=cfg.attacks, certified=cfg.certify is not None)
    suite = Suite(list(cfg.attacks), norm, seed=cfg.seed, batch_size=cfg.batch_size, progress=False)  # checks the names
    # data first: its shape and classes complete plain state_dicts' architectures
    full = load_dataset(cfg.data, cfg.split, data_dir=cfg.data_dir, download=cfg.download, img_size=cfg.img_size)
    subset = eval_subset(full, cfg.n, cfg.seed)
    models: dict[str, nn.Module] = {}
    model_info: dict[str, dict[str, Any]] = {}
    for role, given in (("teacher", teacher), ("student", student)):
        models[role], model_info[role] = _resolve_model(cfg, role, given, full)
        if getattr(cfg, role) is None:  # an in-memory model: named in the recorded config
            setattr(cfg, role, model_info[role]["path"] or f"<in-memory {type(models[role].net).__name__}>")
    check_compatible(models["teacher"], models["student"])
    needs_grad = bool(cfg.llm or any(a not in BLACK_BOX for a in cfg.attacks))
    for role in ROLES:
        _check_model_data(role, models[role], subset, needs_grad=needs_grad)
    check_compatible(models["teacher"], models["student"])  # again, with filled metadata
    for role in ROLES:
        models[role].to(device).eval()
        model_info[role]["meta"] = models[role].meta.to_dict()
    indices = subset.indices.to(torch.int64).cpu()
    idx_hash = hashlib.sha256(indices.numpy().astype("<i8").tobytes()).hexdigest()
    num_classes = int(models["teacher"].meta.num_classes)
    data_info = {
        "dataset": full.name,
        "requested": cfg.data,
        "split": cfg.split,
        "n": len(subset),
        "n_requested": cfg.n,
        "n_available": len(full),
        "seed": cfg.seed,
        "input_shape": list(subset.input_shape),
        "num_classes": num_classes,
        "class_names": list(full.classes) if full.classes else None,
        "indices_sha256": idx_hash,
        "label_counts": torch.bincount(subset.y, minlength=num_classes).tolist(),
    }
    if len(subset) < cfg.n:
        log.warning("%s %s has only %d samples; auditing all of them (asked for %d)", full.name, cfg.split, len(subset), cfg.n)
    fingerprint = {
        "schema_version": SCHEMA_VERSION,
        "teacher": model_info["teacher"]["weights_sha256"],
        "student": model_info["student"]["weights_sha256"],
        "indices_sha256": idx_hash,
        "dataset": full.name,
        "split": cfg.split,
        "seed": cfg.seed,
        "norm": norm.value,
        "radii": list(radii),
        "attacks": list(cfg.attacks),
        "certify": cfg.certify,
        "llm": cfg.llm,
        "llm_steps": cfg.llm_steps,
        "llm_restarts": cfg.llm_restarts,
        "linear_region_radius": cfg.linear_region_radius,
    }
    return AuditPlan(
        cfg=cfg, models=types.MappingProxyType(models), model_info=types.MappingProxyType(model_info),
        x=subset.float_x().to(device), y=subset.y.to(device), indices=indices, data_info=data_info, radii=radii,
        norm=norm, gates=gates, suite=suite, device=device, fingerprint=fingerprint,
    )


def _resolve_model(cfg: AuditConfig, role: str, given: Any, data: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model of ``role`` as a robust model (loaded from ``cfg`` when not ``given``) and its results record."""
    from robkd.models import RobustModel, as_robust_model, load_model
    from robkd.models.identity import model_sha256
    from robkd.utils.io import sha256_file

    info: dict[str, Any] = {"role": role}
    if given is not None:
        if not isinstance(given, nn.Module):
            raise UsageError(f"{role} must be a model file path or a torch.nn.Module, got {type(given).__name__}")
        model = given if isinstance(given, RobustModel) else as_robust_model(given)
        info["loaded_by_audit"] = False
        info["path"] = model.meta.source.get("path") if model.meta.source else None
    else:
        path = getattr(cfg, role)
        if path is None:
            raise UsageError(f"no {role} model given")
        model = load_model(path, dataset=data, **cfg.model_kwargs(role, path))
        info["loaded_by_audit"] = True
        info["path"] = str(path)
        info["file_sha256"] = sha256_file(path)
    info["weights_sha256"] = model_sha256(model)
    info["parameters"] = int(sum(p.numel() for p in model.parameters()))
    return model, info


def _check_model_data(role: str, model: nn.Module, data: Any, *, needs_grad: bool = True) -> None:
    """The model takes the data's images and returns one row of floating-point logits per image, one per
    class of the data; fills the model's missing shape and class metadata."""
    meta = model.meta
    shape = tuple(data.input_shape)
    if meta.input_shape is None:
        meta.input_shape = shape
    elif tuple(meta.input_shape) != shape:
        raise DataError(f"the {role} takes inputs of shape {list(meta.input_shape)} but {data.name} images are {list(shape)}")
    probe = data.float_x(slice(0, 2)).to(model_device(model))
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
