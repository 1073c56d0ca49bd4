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
import re
import types
from typing import Any, Mapping

import torch
from torch import nn

from robkd.auditing.config import AuditConfig
from robkd.auditing.gates import Gate, parse_gate, validate_gate
from robkd.auditing.result import SCHEMA_VERSION
from robkd.errors import DataError, ModelLoadError, ModelRuntimeError, UsageError
from robkd.models.messages import cause_line
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
              ctx: Any = None, data: Any = None) -> AuditPlan:
    """Validate and resolve everything an audit needs (raises a :class:`~robkd.errors.RobkdError` on bad
    input); ``teacher``/``student`` given here override ``cfg.teacher/student``; ``data`` (in-memory data:
    ``(x, y)`` tensors, a Dataset or a DataLoader) overrides ``cfg.data``; ``ctx`` is the
    :class:`~robkd.distributed.DistContext` (its device wins under torchrun)."""
    from robkd.models import check_compatible

    cfg, device, norm, radii, suite = _settings(cfg, ctx, data)
    gates = tuple(parse_gate(g) for g in cfg.gates)
    for g in gates:
        validate_gate(g, radii=radii, attacks=cfg.attacks, certified=cfg.certify is not None,
                      severities=cfg.severities if cfg.corruptions else None)
    ev = _load_data(cfg, data)  # data first: its shape and classes complete plain state_dicts' architectures
    models: dict[str, nn.Module] = {}
    model_info: dict[str, dict[str, Any]] = {}
    for role, given in (("teacher", teacher), ("student", student)):
        models[role], model_info[role] = _resolve_model(cfg, role, given, ev)
    check_compatible(models["teacher"], models["student"])
    _check_norm_flags_used(cfg, models)
    for role in ROLES:
        _check_model_data(role, models[role], ev, needs_grad=_needs_grad(cfg))
    check_compatible(models["teacher"], models["student"])  # again, with filled metadata
    fingerprint = {
        "schema_version": SCHEMA_VERSION,
        "teacher": model_info["teacher"]["weights_sha256"],
        "student": model_info["student"]["weights_sha256"],
    }
    return _finish_plan(cfg, models, model_info, ev, radii, norm, gates, suite, device, fingerprint)


def make_model_plan(cfg: AuditConfig, model: nn.Module | None = None, ctx: Any = None, data: Any = None,
                    role: str = "model") -> AuditPlan:
    """The plan of one model's evaluation (:func:`robkd.auditing.evaluation.evaluate`): the checks of
    :func:`make_plan` for a single model (``model``, else the file ``cfg.teacher``), keyed ``role``; no gates."""
    cfg, device, norm, radii, suite = _settings(cfg, ctx, data)
    if "transfer" in cfg.attacks:
        raise UsageError("the transfer attack attacks one model with the other's adversarial examples: it needs a "
                         "teacher and a student (robkd.audit)")
    if cfg.gates:
        raise UsageError("gates compare a teacher and a student: robkd.evaluate takes none (use robkd.audit)")
    ev = _load_data(cfg, data)
    m, info = _resolve_model(cfg, role, model, ev, path=cfg.teacher)
    _check_model_data(role, m, ev, needs_grad=_needs_grad(cfg))
    fingerprint = {"schema_version": SCHEMA_VERSION, role: info["weights_sha256"]}
    return _finish_plan(cfg, {role: m}, {role: info}, ev, radii, norm, (), suite, device, fingerprint)


def _settings(cfg: AuditConfig, ctx: Any, data: Any) -> tuple[AuditConfig, torch.device, Norm, tuple[float, ...], Any]:
    """The copied and validated config (``data`` named for in-memory data, ``eps`` the dataset's usual radius
    when not given), the device, the norm, the radii and the attack suite (which checks the attack names)."""
    from robkd.attacks import Suite
    from robkd.data import IN_MEMORY, dataset_info, is_in_memory

    cfg = copy.deepcopy(cfg).validate()
    if is_in_memory(data):
        cfg.data = IN_MEMORY
    device = ctx.device if ctx is not None and ctx.distributed else parse_device(cfg.device)
    norm = Norm.parse(cfg.norm)
    if cfg.eps is None:  # the dataset's usual headline radius
        info = None if is_in_memory(data) else dataset_info(cfg.data)
        if info is None:
            what = "in-memory data" if is_in_memory(data) else f"dataset {cfg.data!r}"
            raise UsageError(f"no radius given for {what}: pass --eps (eps= in Python; e.g. 8/255 or 1/255,2/255,...,8/255)")
        cfg.eps = [float(info.default_eps)]
    radii = tuple(float(r) for r in cfg.eps)
    from robkd.attacks.transfer import TRANSFER, own_attacks

    own = own_attacks(cfg.attacks)  # transfer runs as a stage after both suites (robkd.auditing.transfer_stage)
    if not own:
        raise UsageError(f"the {TRANSFER} attack needs at least one attack of each model's own "
                         f"(e.g. --attacks pgd-20,{TRANSFER})")
    suite = Suite(own, norm, seed=cfg.seed, batch_size=cfg.batch_size, progress=False)  # checks the names
    if cfg.corruptions:
        from robkd.analysis.corruptions import check_name

        for c in cfg.corruptions:
            if c != "all":
                check_name(c)
    return cfg, device, norm, radii, suite


def _needs_grad(cfg: AuditConfig) -> bool:
    from robkd.analysis.sanity import BLACK_BOX

    return bool(cfg.llm or any(a not in BLACK_BOX for a in cfg.attacks))


@dataclasses.dataclass(frozen=True)
class _Data:
    """The evaluation data: the seeded ``subset`` (what is attacked), ``hint`` (what completes a plain
    state_dict's architecture: the whole split, or the shape of in-memory data), and its records."""

    subset: Any  # robkd.data.ImageData
    hint: Any
    name: str
    n_available: int
    classes: list[str] | None
    memory: Any = None  # robkd.data.MemoryData for in-memory data
    default: bool = False  # the dataset is the default one (no --data given)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.subset.input_shape)


def _load_data(cfg: AuditConfig, data: Any) -> _Data:
    """The split and its seeded subset (or in-memory data read with the same subset rule)."""
    from robkd.data import eval_subset, from_memory, is_in_memory, load_dataset

    if is_in_memory(data):
        mem = from_memory(data, cfg.n, cfg.seed)
        hint = types.SimpleNamespace(input_shape=mem.data.input_shape, num_classes=None)
        return _Data(mem.data, hint, mem.data.name, mem.n_available, None, memory=mem)
    full = load_dataset(cfg.data, cfg.split, data_dir=cfg.data_dir, download=cfg.download, img_size=cfg.img_size)
    subset = eval_subset(full, cfg.n, cfg.seed)
    return _Data(subset, full, full.name, len(full), list(full.classes) if full.classes else None,
                 default=cfg.data == AuditConfig.data)


def _finish_plan(cfg: AuditConfig, models: dict[str, nn.Module], model_info: dict[str, dict[str, Any]], ev: _Data,
                 radii: tuple[float, ...], norm: Norm, gates: tuple[Gate, ...], suite: Any, device: torch.device,
                 fingerprint: dict[str, Any]) -> AuditPlan:
    """Models on the device with their metadata recorded, the data record and the fingerprint, as the plan."""
    subset = ev.subset
    for role, m in models.items():
        if getattr(cfg, role, None) is None and role in ROLES:  # an in-memory model: named in the recorded config
            setattr(cfg, role, model_info[role]["path"] or f"<in-memory {type(m.net).__name__}>")
        m.to(device).eval()
        model_info[role]["meta"] = m.meta.to_dict()
    indices = subset.indices.to(torch.int64).cpu()
    idx_hash = hashlib.sha256(indices.numpy().astype("<i8").tobytes()).hexdigest()
    num_classes = int(next(iter(models.values())).meta.num_classes)
    data_info: dict[str, Any] = {
        "dataset": ev.name,
        "requested": cfg.data,
        "split": cfg.split,
        "n": len(subset),
        "n_requested": cfg.n,
        "n_available": ev.n_available,
        "seed": cfg.seed,
        "input_shape": list(subset.input_shape),
        "num_classes": num_classes,
        "class_names": ev.classes,
        "indices_sha256": idx_hash,
        "label_counts": torch.bincount(subset.y, minlength=num_classes).tolist(),
    }
    if ev.memory is not None:  # no file names these samples: their content does
        data_info.update(source="in-memory", in_memory_kind=ev.memory.kind, content_sha256=ev.memory.sha256)
    if len(subset) < cfg.n:
        log.warning("%s %s has only %d samples; auditing all of them (asked for %d)", ev.name, cfg.split, len(subset), cfg.n)
    fingerprint.update({
        "indices_sha256": idx_hash,
        "dataset": ev.name,
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
    })
    if ev.memory is not None:
        fingerprint["content_sha256"] = ev.memory.sha256
    return AuditPlan(
        cfg=cfg, models=types.MappingProxyType(models), model_info=types.MappingProxyType(model_info),
        x=subset.float_x().to(device), y=subset.y.to(device), indices=indices, data_info=data_info, radii=radii,
        norm=norm, gates=gates, suite=suite, device=device, fingerprint=fingerprint,
    )


def _resolve_model(cfg: AuditConfig, role: str, given: Any, ev: _Data, path: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model of ``role`` as a robust model (loaded from ``cfg`` when not ``given``) and its results record."""
    from robkd.models import load_model
    from robkd.models.identity import model_sha256
    from robkd.models.wrapper import in_memory_model
    from robkd.utils.io import sha256_file

    info: dict[str, Any] = {"role": role}
    if given is not None:
        if not isinstance(given, nn.Module):
            raise UsageError(f"{role} must be a model file path or a torch.nn.Module, got {type(given).__name__}")
        model = in_memory_model(given, role, mean=cfg.mean, std=cfg.std, num_classes=cfg.num_classes,
                                input_shape=cfg.input_shape)
        info["loaded_by_audit"] = False
        info["path"] = model.meta.source.get("path") if model.meta.source else None
    else:
        path = path if path is not None else getattr(cfg, role, None)
        if path is None:
            raise UsageError(f"no {role} model given")
        kwargs = cfg.model_kwargs(role if role in ROLES else "teacher", path)
        try:
            model = load_model(path, dataset=ev.hint, **kwargs)
        except ModelLoadError as exc:
            raise _with_data_hint(exc, cfg, ev, path, kwargs) from exc
        info["loaded_by_audit"] = True
        info["path"] = str(path)
        info["file_sha256"] = sha256_file(path)
    info["weights_sha256"] = model_sha256(model)
    info["parameters"] = int(sum(p.numel() for p in model.parameters()))
    return model, info


def _check_norm_flags_used(cfg: AuditConfig, models: Mapping[str, nn.Module]) -> None:
    """``--mean``/``--std`` fill in what a model file lacks; given when both files carry another normalisation,
    they would apply to neither model: refused, not silently ignored."""
    for name in ("mean", "std"):
        flag = getattr(cfg, name)
        if flag is None:
            continue
        own = {role: getattr(models[role].meta, name) for role in ROLES}
        if all(v is not None and not _close(v, flag) for v in own.values()):
            shown = ",".join(f"{v:g}" for v in own["teacher"])
            raise UsageError(f"--{name} {','.join(f'{v:g}' for v in flag)} applies to neither model: both files carry "
                             f"their own normalisation (the teacher's {name} = {shown}): drop --{name}")


def _close(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(abs(float(u) - float(v)) <= 1e-6 * max(1.0, abs(float(u))) for u, v in zip(a, b))


def _check_model_data(role: str, model: nn.Module, ev: _Data, *, needs_grad: bool = True) -> None:
    """The model takes the data's images and returns one row of floating-point logits per image, one per
    class of the data; fills the model's missing shape and class metadata."""
    meta = model.meta
    data = ev.subset
    shape = tuple(data.input_shape)
    if meta.input_shape is None:
        meta.input_shape = shape
    elif tuple(meta.input_shape) != shape:
        raise DataError(f"the {role} takes inputs of shape {list(meta.input_shape)} but {ev.name} images are "
                        f"{list(shape)}{_hint_suffix(ev, tuple(meta.input_shape))}")
    probe = data.float_x(slice(0, 2)).to(model_device(model))
    try:
        with torch.no_grad():
            out = model.eval()(probe)
    except Exception as exc:  # user models fail in many ways
        channels = re.search(r"to have (\d+) channels", str(exc))
        expected = (int(channels.group(1)),) if channels else None
        raise ModelLoadError(f"the {role} fails on {ev.name} images of shape {list(shape)}: {cause_line(exc)}"
                             f"{_hint_suffix(ev, expected)}") from exc
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
    if ev.classes and len(ev.classes) != k:
        raise DataError(f"the {role} has {k} classes but {ev.name} has {len(ev.classes)}")
    if int(data.y.max()) >= k or int(data.y.min()) < 0:
        raise DataError(f"{ev.name} labels span [{int(data.y.min())}, {int(data.y.max())}] but the {role} has {k} classes")


# ----------------------------------------------------------------------------- first errors that name the data
def _shape_text(shape: Any) -> str:
    return "x".join(str(int(v)) for v in shape)


def _hint_suffix(ev: _Data, expected: tuple[int, ...] | None) -> str:
    """``"; <why>: <fix>"`` when the data's shape may be the cause of a model failure: always when the model's
    expected shape is known, and when the data is the default dataset (no ``--data`` given)."""
    if ev.memory is not None or (expected is None and not ev.default):
        return ""
    got = _shape_text(ev.input_shape)
    if ev.default:
        lead = f"no --data given, so the default dataset {ev.name} ({got}) was used"
    else:
        lead = f"the data {ev.name} is {got}"
    if expected is None:
        return f"; {lead}: pass --data for this model's dataset (e.g. --data cifar10 --data-dir DIR, or a .npz/.pt file)"
    want = _shape_text(expected) if len(expected) == 3 else f"{expected[0]}-channel images"
    return f"; {lead}; this model expects {want}: pass --data {_suggest(expected)}"


def _suggest(expected: tuple[int, ...]) -> str:
    """The registered datasets of that shape (or channel count) as a ``--data`` suggestion."""
    from robkd.data import DATASETS

    names = [name for name, info in DATASETS.items() if info.name != "imagefolder" and not name.endswith("-slice")
             and (tuple(info.input_shape) == tuple(expected) or len(expected) == 1 and info.input_shape[0] == expected[0])]
    shown = " or ".join(names[:2])
    if shown:
        return f"{shown} --data-dir DIR (or a .npz/.pt file of such images)"
    return "a .npz/.pt file of such images (or --data imagefolder --data-dir DIR)"


def _with_data_hint(exc: ModelLoadError, cfg: AuditConfig, ev: _Data, path: Any, kwargs: dict[str, Any]) -> ModelLoadError:
    """A loading failure of a weights-only file whose architecture took its input shape from the data: the
    error again, naming the data and (when the file loads at another registered shape) the shape it wants."""
    from robkd.models import load_model

    if ev.memory is not None or kwargs.get("input_shape") is not None or not kwargs.get("arch"):
        return exc
    from robkd.data import DATASETS

    own = tuple(ev.input_shape)
    for shape in dict.fromkeys(tuple(i.input_shape) for i in DATASETS.values()):
        if shape == own:
            continue
        try:
            load_model(path, **{**kwargs, "input_shape": shape})
        except Exception:  # noqa: BLE001 - not this shape either
            continue
        return type(exc)(f"{exc}{_hint_suffix(ev, shape)}")
    return type(exc)(f"{exc}{_hint_suffix(ev, None)}") if ev.default else exc


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
