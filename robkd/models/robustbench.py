"""RobustBench model-zoo architectures for checkpoint files the user already has (``--arch robustbench:<id>``).

An optional extra (``pip install 'robkd[robustbench]'``): the ``robustbench`` package is imported only when such
an architecture is named, and never downloads anything here. ``<id>`` is a model-zoo id
(``Carmon2019Unlabeled``), optionally qualified by dataset and threat model (``cifar10/Linf/Standard``) when
it is in several entries. The entry's architecture is built as RobustBench builds it, with its normalisation
inside (RobustBench models take [0,1] pixels, so robkd adds none and refuses ``--mean/--std``).

Checkpoints are read in the layouts RobustBench's own loader accepts: a bare state_dict, or one under
``state_dict`` (or ``last``, ``model_state_dict``, ``model``, ``net``), with keys prefixed by DDP's ``module.``
and/or ``model.``. Loading is strict: the prefix is stripped only when the stripped names are exactly the
architecture's, and the only keys a file may lack are the normalisation constants the architecture defines
itself (``mu``/``sigma``, which older checkpoints predate).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from robkd.errors import ArchitectureError, ModelLoadError, UsageError
from robkd.models.messages import short_list

KIND = "robustbench"
INSTALL_HINT = "pip install 'robkd[robustbench]' (or pip install robustbench)"
#: dataset of a model-zoo entry -> (input shape, classes)
DATASETS: dict[str, tuple[tuple[int, int, int], int]] = {
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "imagenet": ((3, 224, 224), 1000),
}
THREATS = ("Linf", "L2", "corruptions")
#: containers of a checkpoint's state_dict, searched in this order
CONTAINER_KEYS = ("state_dict", "last", "model_state_dict", "model", "net")
#: prefixes tried, in this order, when a checkpoint's names do not match the architecture's
PREFIXES = ("module.", "model.", "module.model.", "model.module.")
#: constants a RobustBench architecture defines itself (its normalisation); a checkpoint may lack them
NORM_BUFFERS = ("mu", "sigma")


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """A model-zoo entry: where it is, and the factory that builds its architecture."""

    dataset: str
    threat_model: str
    model_id: str
    factory: Callable[[], nn.Module]

    @property
    def qualified(self) -> str:
        return f"{self.dataset}/{self.threat_model}/{self.model_id}"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return DATASETS.get(self.dataset, ((3, 32, 32), 10))[0]

    @property
    def num_classes(self) -> int:
        return DATASETS.get(self.dataset, ((3, 32, 32), 10))[1]


def model_dicts() -> Mapping[Any, Any]:
    """RobustBench's model zoo (``{dataset: {threat model: {id: entry}}}``); :class:`ArchitectureError` with
    the way to install it when the package is missing."""
    try:
        from robustbench.model_zoo.models import model_dicts as zoo
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "robustbench":
            raise ArchitectureError(f"--arch {KIND}:<id> needs the robustbench package, which is not installed: "
                                    f"{INSTALL_HINT}") from exc
        raise ArchitectureError(f"--arch {KIND}:<id>: the installed robustbench package cannot be imported "
                                f"({type(exc).__name__}: {exc}); reinstall it: {INSTALL_HINT}") from exc
    except Exception as exc:  # noqa: BLE001 - a broken installation
        raise ArchitectureError(f"--arch {KIND}:<id>: importing robustbench failed ({type(exc).__name__}: "
                                f"{str(exc)[:200]}); reinstall it: {INSTALL_HINT}") from exc
    return zoo


def find_entry(name: str, zoo: Mapping[Any, Any] | None = None, *, num_classes: int | None = None) -> ZooEntry:
    """The entry ``name`` (``id``, ``dataset/id`` or ``dataset/threat/id``) names; an id in several entries is
    narrowed by ``num_classes`` (the data's), then by threat model (Linf, L2, corruptions: RobustBench reuses
    one architecture across them), and refused when datasets still differ."""
    parts = [p for p in str(name).strip().split("/")]
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise ArchitectureError(f"bad RobustBench model {name!r}: use {KIND}:<id>, {KIND}:<dataset>/<id> or "
                                f"{KIND}:<dataset>/<threat model>/<id>")
    model_id = parts[-1]
    want_ds = parts[0].lower() if len(parts) >= 2 else None
    want_tm = parts[1] if len(parts) == 3 else None
    zoo = model_dicts() if zoo is None else zoo
    found = []
    for ds_key, threats in zoo.items():
        ds = str(getattr(ds_key, "value", ds_key)).lower()
        if want_ds is not None and ds != want_ds:
            continue
        for tm_key, models in threats.items():
            tm = str(getattr(tm_key, "value", tm_key))
            if want_tm is not None and tm.lower() != want_tm.lower():
                continue
            entry = models.get(model_id) if isinstance(models, Mapping) else None
            if entry is not None:
                factory = entry.get("model") if isinstance(entry, Mapping) else None
                if not callable(factory):
                    raise ArchitectureError(f"RobustBench entry {ds}/{tm}/{model_id} has no model factory")
                found.append(ZooEntry(ds, tm, model_id, factory))
    if not found:
        where = "/".join(p for p in (want_ds, want_tm) if p) or "any dataset"
        raise ArchitectureError(f"no RobustBench model {model_id!r} in {where} of the installed robustbench's zoo")
    if num_classes is not None and len({e.dataset for e in found}) > 1:
        found = [e for e in found if e.num_classes == num_classes] or found
    if len({e.dataset for e in found}) > 1:
        options = ", ".join(f"{KIND}:{e.qualified}" for e in found[:6])
        raise ArchitectureError(f"RobustBench model {model_id!r} is in several datasets: name one ({options})")
    order = {t.lower(): i for i, t in enumerate(THREATS)}
    return sorted(found, key=lambda e: order.get(e.threat_model.lower(), len(THREATS)))[0]


def create(name: str, *, num_classes: int | None = None, in_chans: int | None = None, img_size: int | None = None,
           **kwargs: Any) -> nn.Module:
    """The architecture of ``name`` (registry hook of ``robustbench:<id>``): built by the entry's factory, which
    takes no arguments; classes and input shape given must be the entry's."""
    if kwargs:
        raise ArchitectureError(f"{KIND}:{name} takes no architecture arguments, got {sorted(kwargs)}")
    entry = find_entry(name, num_classes=num_classes)
    c, h, _ = entry.input_shape
    if num_classes is not None and num_classes != entry.num_classes:
        raise ArchitectureError(f"{KIND}:{entry.qualified} has {entry.num_classes} classes, not {num_classes}")
    if in_chans is not None and in_chans != c:
        raise ArchitectureError(f"{KIND}:{entry.qualified} takes {c}-channel images, not {in_chans}")
    try:
        return entry.factory()
    except Exception as exc:  # noqa: BLE001 - the package's own factory
        raise ArchitectureError(f"building {KIND}:{entry.qualified} failed: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------- checkpoints
def find_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state_dict in a checkpoint object (a bare one, or under one of :data:`CONTAINER_KEYS`)."""
    for _ in range(4):
        if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in obj.items()):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        key = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    raise ModelLoadError(f"{source} holds no state_dict (looked for a mapping of tensors, or one under "
                         f"{', '.join(CONTAINER_KEYS)})")


def fit_state_dict(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` with the prefix (none, ``module.``, ``model.`` or both) that makes its names exactly the
    architecture's (``own``: its state_dict); the normalisation constants it lacks taken from ``own``.
    :class:`ModelLoadError` naming what differs for the closest prefix when none fits."""
    best: tuple[int, str, dict[str, torch.Tensor]] | None = None
    for prefix in ("",) + PREFIXES:
        if prefix and not any(k.startswith(prefix) for k in state):
            continue
        cand = {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v for k, v in state.items()}
        if len(cand) != len(state):  # stripping merged two names: not this prefix
            continue
        missing = set(own) - set(cand)
        if missing and all(m.rsplit(".", 1)[-1] in NORM_BUFFERS for m in missing):
            cand.update({m: own[m].detach().clone() for m in missing})
            missing = set()
        score = len(missing) + len(set(cand) - set(own))
        if best is None or score < best[0]:
            best = (score, prefix, cand)
        if score == 0:
            break
    if best is None:  # "" is always tried: unreachable
        raise ModelLoadError(f"{source} holds no state_dict")
    score, _, cand = best
    if score:
        missing, unexpected = sorted(set(own) - set(cand)), sorted(set(cand) - set(own))
        parts = ([f"missing keys {short_list(missing)}"] if missing else []) + (
            [f"unexpected keys {short_list(unexpected)}"] if unexpected else [])
        raise ModelLoadError(f"weights in {source} do not match the architecture: {'; '.join(parts)}")
    return cand


def load_robustbench(path: Path, arch: str, *, num_classes: int | None = None, state: Any = None) -> tuple[nn.Module, Any]:
    """The model-zoo architecture ``arch`` (``robustbench:<id>``) with the weights of ``path`` (a ``torch.save``
    or safetensors file; ``state``: its already-read content), strictly loaded; returns ``(net, meta)``."""
    from robkd.models.weights import load_state_dict_strict
    from robkd.types import ModelMeta

    name = arch.split(":", 1)[1]
    entry = find_entry(name, num_classes=num_classes)
    net = create(entry.qualified)
    obj = state if state is not None else _read(path)
    sd = fit_state_dict(find_state_dict(obj, str(path)), net.state_dict(), str(path))
    load_state_dict_strict(net, sd, str(path))
    meta = ModelMeta(arch=f"{KIND}:{entry.qualified}", num_classes=entry.num_classes, input_shape=entry.input_shape,
                     dataset=entry.dataset)
    return net, meta


def check_flags(arch: str, mean: Any, std: Any) -> None:
    """RobustBench models normalise inside: ``--mean/--std`` would normalise twice."""
    if mean is not None or std is not None:
        raise UsageError(f"{arch} normalises its inputs inside the architecture (RobustBench models take [0,1] pixels): "
                         "drop --mean/--std")


def _read(path: Path) -> Any:
    from robkd.models.formats.detect import detect_format

    fmt = detect_format(path)
    if fmt in ("safetensors", "robkd"):
        from robkd.models.safetensors_header import read_tensors

        return read_tensors(path)
    if fmt != "torch":
        raise ModelLoadError(f"{path} is a {fmt} file; --arch {KIND}:<id> reads state_dict checkpoints "
                             "(torch.save or safetensors)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickled objects beyond tensors, corrupt files
        line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ModelLoadError(f"cannot read {path} as a state_dict checkpoint (weights only): {line[:200]}") from exc
