"""Building a model from an architecture name, with a size guard: the architecture is first built on the
``meta`` device (nothing allocated) and refused when absurdly large, so a corrupt or hostile file's
metadata never makes robkd allocate terabytes."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from robkd.errors import ModelLoadError, RobkdError
from robkd.models.messages import first_line, short_list
from robkd.models.registry import create_model, split_arch
from robkd.models.weights import TensorSpec, match_weights, tensor_specs
from robkd.models.wrapper import RobustModel
from robkd.types import ModelMeta, short_repr

log = logging.getLogger(__name__)

MAX_ELEMENTS = 2**32
"""Most parameter and buffer values of a model robkd builds from an architecture name (16 GiB as float32)."""
MAX_TENSORS = 20_000
"""Most parameter and buffer tensors of such a model (the largest timm models have a few thousand)."""
MAX_MODULES = 50_000
"""Most submodule registrations while building such a model."""


class _TooLarge(ModelLoadError):
    """An architecture's arguments ask for more than :data:`MAX_ELEMENTS` values, :data:`MAX_TENSORS` tensors
    or :data:`MAX_MODULES` modules."""


def build_model(
    arch: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dataset: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
) -> RobustModel:
    """Create a fresh (randomly initialised) :class:`RobustModel` from an architecture name."""
    meta = ModelMeta(
        arch=arch,
        arch_kwargs=dict(arch_kwargs or {}),
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
        dataset=dataset,
    ).validate()
    model = RobustModel(build_arch(meta), meta)
    return model.eval()


def build_arch(meta: ModelMeta, weights: Mapping[str, TensorSpec] | None = None, source: str = "the file") -> nn.Module:
    """Build ``meta.arch`` (random weights). Its size is checked before anything is allocated: the
    architecture is first built on the ``meta`` device, refused past :data:`MAX_ELEMENTS`, and compared
    with ``weights`` (the file's tensor names, shapes and kinds) when given. User code
    (``module.path:Factory``) or a timm model that cannot run on the meta device is built directly,
    under a guard that stops at the first tensor past the limits."""
    if not meta.arch:
        raise ModelLoadError(
            f"{source} holds only weights (a state_dict): name the architecture with --arch "
            "(robkd:<name>, timm:<name>, module.path:Factory or robustbench:<model id>)"
        )
    if meta.input_shape is None:
        raise ModelLoadError(f"architecture {meta.arch} needs the input shape: pass --input-shape C,H,W or a dataset")
    if len(meta.input_shape) != 3 or not isinstance(meta.arch_kwargs, Mapping):
        raise ModelLoadError(f"bad architecture metadata: input shape {list(meta.input_shape)} (want C,H,W), "
                             f"arch_kwargs {meta.arch_kwargs!r} (want a mapping)")
    c, h, _ = meta.input_shape
    kwargs: dict[str, Any] = dict(num_classes=meta.num_classes or 10, in_chans=c, img_size=h)
    clash = sorted(set(kwargs) & set(meta.arch_kwargs))
    if clash:
        raise ModelLoadError(f"arch_kwargs of {meta.arch} must not set {clash}: they come from the model's metadata")
    kwargs.update(meta.arch_kwargs)
    what = f"{meta.arch} with arguments {short_repr(dict(meta.arch_kwargs))}"
    try:
        with torch.device("meta"), _size_guard(what, values=False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Initializing zero-element tensors is a no-op"
            skeleton = _create(meta.arch, kwargs, what)
    except _TooLarge:
        raise
    except RobkdError as exc:
        if split_arch(meta.arch)[0] == "robkd":  # robkd's own architectures all build on the meta device
            raise
        # timm or user code that cannot run on the meta device (e.g. it reads a tensor's values): build it
        # for real, under the size guard
        log.debug("building %s on the meta device failed (%s); building it directly", meta.arch, exc)
        with _size_guard(what):
            return _create(meta.arch, kwargs, what)
    state = skeleton.state_dict()
    total = sum(int(t.numel()) for t in skeleton.parameters()) + sum(int(t.numel()) for t in skeleton.buffers())
    if total > MAX_ELEMENTS:
        raise _TooLarge(f"{what} would hold {_size(total)}; robkd builds at most {_size(MAX_ELEMENTS)}: the "
                        f"architecture's arguments are absurd or the file's metadata is corrupt")
    empty = [name for name, t in skeleton.named_parameters() if t.numel() == 0]
    if empty:
        raise ModelLoadError(f"{what} has parameters with no values ({short_list(empty, 3)}): the architecture's "
                             f"arguments are wrong")
    if weights is not None:
        match_weights(tensor_specs(state), weights, source)
    return _create(meta.arch, kwargs, what)


def _create(arch: str, kwargs: dict[str, Any], what: str) -> nn.Module:
    """:func:`~robkd.models.registry.create_model`, a factory's own failure as one :class:`ModelLoadError`."""
    try:
        return create_model(arch, **kwargs)
    except RobkdError:
        raise
    except Exception as exc:  # noqa: BLE001 - arguments the factory rejects (bad type, negative width, ...)
        raise ModelLoadError(f"cannot build {what}: {type(exc).__name__}: {first_line(exc)}") from exc


def _size(n: int) -> str:
    """``n`` values and their float32 size, e.g. ``1.1e+12 values (4.4 TB as float32)``."""
    nbytes, unit = 4.0 * n, "B"
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if nbytes < 1000 or unit == "EB":
            break
        nbytes /= 1000
    return f"{n:.3g} values ({nbytes:.3g} {unit} as float32)"


@contextlib.contextmanager
def _size_guard(what: str, *, values: bool = True) -> Iterator[None]:
    """Count the parameters, buffers and submodules registered while building ``what``; past
    :data:`MAX_TENSORS` or :data:`MAX_MODULES` (and :data:`MAX_ELEMENTS` values, with ``values``) raise
    :class:`_TooLarge` at once (a layer's tensor is registered before it is initialised, so nothing that
    large is ever touched). On the ``meta`` device values cost nothing: count them all, then report the size."""
    from torch.nn.modules import module as mod

    seen = {"values": 0, "tensors": 0, "modules": 0}
    limits = {"values": MAX_ELEMENTS if values else float("inf"), "tensors": MAX_TENSORS, "modules": MAX_MODULES}

    def count(key: str, n: int) -> None:
        seen[key] += n
        if seen[key] > limits[key]:
            amount = _size(limits[key]) if key == "values" else f"{limits[key]:,} {key}"
            raise _TooLarge(f"{what} would hold more than {amount}, the most robkd builds: the "
                            f"architecture's arguments are absurd or the file's metadata is corrupt")

    def on_tensor(module: nn.Module, name: str, t: Any) -> None:
        if isinstance(t, torch.Tensor):
            count("tensors", 1)
            count("values", int(t.numel()))

    def on_module(module: nn.Module, name: str, sub: Any) -> None:
        count("modules", 1)

    handles = [mod.register_module_parameter_registration_hook(on_tensor),
               mod.register_module_buffer_registration_hook(on_tensor),
               mod.register_module_module_registration_hook(on_module)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
