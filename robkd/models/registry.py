"""Architecture registry (timm style): ``robkd:<name>``, ``timm:<name>``, ``module.path:Factory``, and
``robustbench:<model id>`` (RobustBench's model zoo, an optional extra: :mod:`robkd.models.robustbench`).

A factory is called as ``factory(num_classes=..., in_chans=..., img_size=..., **kwargs)``
and returns an ``nn.Module`` that takes *normalised* inputs; normalisation is
added by :class:`robkd.models.wrapper.RobustModel`.

This module holds only the registry: it imports no architecture. The built-in ones
(:mod:`robkd.models.archs`) register themselves when imported, which ``robkd.models``
does first, so they are registered before anything of the package can be used.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import numbers
import os
import sys
from typing import Any, Callable

from torch import nn

from robkd.errors import ArchitectureError, RobkdError
from robkd.types import short_repr


@dataclasses.dataclass(frozen=True)
class ArchEntry:
    """A registered architecture and its default configuration."""

    name: str
    factory: Callable[..., nn.Module]
    input_sizes: tuple[int, ...]
    description: str


_REGISTRY: dict[str, ArchEntry] = {}


def register_model(name: str, *, input_sizes: tuple[int, ...] = (28, 32), description: str = "") -> Callable:
    """Decorator registering ``factory`` under ``robkd:<name>``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} registered twice")
        doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
        _REGISTRY[name] = ArchEntry(name, factory, input_sizes, doc)
        return factory

    return deco


def check_arg(arch: str, name: str, value: Any, lo: float, hi: float, *, integer: bool = True) -> Any:
    """An architecture argument checked for type and range (``lo <= value <= hi``); :class:`ArchitectureError`
    naming it otherwise (arguments may come from a file's metadata)."""
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if not ok_type or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        span = f"{int(lo):,} to {int(hi):,}" if integer else f"{lo:g} to {hi:g}"
        raise ArchitectureError(f"{arch}: {name} must be {kind} from {span}, got {short_repr(value)}")
    return int(value) if integer else float(value)


def list_models() -> list[ArchEntry]:
    """All built-in architectures, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def split_arch(spec: str) -> tuple[str, str]:
    """Split ``'robkd:cnn_small'`` into ``('robkd', 'cnn_small')``; bare names mean ``robkd:``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ArchitectureError("empty architecture name: use robkd:<name>, timm:<name> or module.path:Factory")
    spec = spec.strip()
    if ":" not in spec:
        return "robkd", spec
    kind, _, name = spec.partition(":")
    if not name:
        raise ArchitectureError(f"bad architecture {spec!r}: nothing after ':'")
    return kind, name


def create_model(
    spec: str,
    *,
    num_classes: int = 10,
    in_chans: int = 3,
    img_size: int = 32,
    **kwargs: Any,
) -> nn.Module:
    """Create an architecture from ``robkd:<name>``, ``timm:<name>``, ``robustbench:<id>`` or ``module.path:Factory``.

    User code is imported only when named explicitly with ``module.path:Factory``.
    """
    kind, name = split_arch(spec)
    if kind == "robkd":
        entry = _REGISTRY.get(name)
        if entry is None:
            known = ", ".join(sorted(_REGISTRY))
            raise ArchitectureError(f"unknown architecture 'robkd:{name}'; built-in ones: {known}")
        return entry.factory(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    if kind == "timm":
        return _create_timm(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    if kind == "robustbench":  # the optional extra: RobustBench's model zoo
        from robkd.models.robustbench import create

        return create(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    return _create_user(kind, name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)


def _create_timm(name: str, *, num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise ArchitectureError("timm is not installed: pip install timm") from exc
    if not timm.is_model(name):
        raise ArchitectureError(f"unknown architecture 'timm:{name}' (see timm.list_models())")
    kw = dict(num_classes=num_classes, in_chans=in_chans, pretrained=False, **kwargs)
    # models with a fixed patch grid (ViT & co.) take img_size; convnets do not
    try:
        return timm.create_model(name, img_size=img_size, **kw)
    except TypeError:
        return timm.create_model(name, **kw)


def _create_user(module: str, attr: str, *, num_classes: int, in_chans: int, img_size: int, **kwargs: Any) -> nn.Module:
    # `python -m`/`python script.py` put the working directory on the path, the `robkd` console script does
    # not: a module the user names explicitly is looked up there too (and only then)
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ArchitectureError(f"cannot import module {module!r} for architecture '{module}:{attr}': {exc}") from exc
    except Exception as exc:  # the user's module failed while being imported
        raise ArchitectureError(f"importing module {module!r} for architecture '{module}:{attr}' failed: "
                                f"{type(exc).__name__}: {exc}") from exc
    finally:
        if added:
            sys.path.remove(cwd)
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        raise ArchitectureError(f"module {module!r} has no callable {attr!r}")
    params = inspect.signature(factory).parameters
    accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    offered = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    call_kw = offered if accepts_var_kw else {k: v for k, v in offered.items() if k in params}
    try:
        model = factory(**call_kw)
    except RobkdError:  # robkd's own refusal (e.g. the size guard while building): as it is
        raise
    except Exception as exc:  # the user's factory failed: one clear line, not a traceback
        raise ArchitectureError(f"'{module}:{attr}'({', '.join(f'{k}={v!r}' for k, v in call_kw.items())}) failed: "
                                f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"'{module}:{attr}' returned {type(model).__name__}, not an nn.Module")
    return model
