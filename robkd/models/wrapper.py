"""The [0,1]-input model wrapper: normalisation inside, eval mode, metadata attached."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from robkd.errors import UsageError
from robkd.types import ModelMeta


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on NCHW (or NC / NL) inputs.

    A plain affine op, so attacks and bound propagation see it as part of the model.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not len(mean):
            raise UsageError(f"mean and std must have the same non-zero length, got {list(mean)} and {list(std)}")
        if not all(math.isfinite(float(v)) for v in list(mean) + list(std)):
            raise UsageError(f"mean and std must be finite numbers, got {list(mean)} and {list(std)}")
        if any(float(s) <= 0 for s in std):
            raise UsageError(f"std must be > 0, got {list(std)}")
        m = torch.tensor([float(v) for v in mean], dtype=torch.float32)
        s = torch.tensor([float(v) for v in std], dtype=torch.float32)
        self.register_buffer("mean", m.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", s.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean, self.std
        if x.dim() != 4:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            mean, std = mean.view(shape), std.view(shape)
        return (x - mean) / std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class RobustModel(nn.Module):
    """A classifier taking inputs in [0,1] pixel space, with its metadata.

    ``model(x)`` returns logits of ``net(normalize(x))``. ``meta`` describes the
    architecture, classes, input shape, normalisation and provenance.
    """

    def __init__(self, net: nn.Module, meta: ModelMeta | None = None) -> None:
        super().__init__()
        meta = meta or ModelMeta()
        c = meta.input_shape[0] if meta.input_shape else None
        mean = meta.mean if meta.mean is not None else (0.0,) * (c or 1)
        std = meta.std if meta.std is not None else (1.0,) * (c or 1)
        if c is not None and len(mean) == 1 and c > 1:
            mean, std = tuple(mean) * c, tuple(std) * c
        if c is not None and len(mean) != c:
            raise UsageError(f"mean/std have {len(mean)} channels but the input has {c}")
        self.normalize = Normalize(mean, std)
        dtype = next((t.dtype for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point()), None)
        if dtype is not None and dtype != torch.float32:
            self.normalize.to(dtype)  # a float64 net gets float64 inputs: (x - mean) / std promotes x
        self.net = net
        self.meta = meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (CPU when there are none)."""
        from robkd.utils.modules import model_device

        return model_device(self)


def as_robust_model(model: nn.Module, meta: ModelMeta | None = None) -> RobustModel:
    """Wrap a plain module (returned as-is when already a :class:`RobustModel`)."""
    if isinstance(model, RobustModel):
        return model
    return RobustModel(model, meta)


def in_memory_model(
    model: nn.Module,
    role: str = "model",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> RobustModel:
    """A model given in memory as a :class:`RobustModel`, with ``mean``/``std`` (and the classes and input shape)
    applied exactly as to a model file that carries none: a plain module is wrapped with that normalisation
    inside. A :class:`RobustModel` keeps its own metadata; a value it already carries and the argument
    contradicts is refused (:class:`UsageError`: normalising twice, or not at all, would be silently wrong),
    and one it lacks is filled in (its normalisation then rebuilt around the same ``net``)."""
    flags = ModelMeta(
        num_classes=num_classes,
        input_shape=tuple(int(v) for v in input_shape) if input_shape is not None else None,
        mean=tuple(float(v) for v in mean) if mean is not None else None,
        std=tuple(float(v) for v in std) if std is not None else None,
    ).validate()
    if flags.mean is not None and flags.std is not None and len(flags.mean) != len(flags.std):
        raise UsageError(f"mean has {len(flags.mean)} values but std has {len(flags.std)}")
    given = {k: getattr(flags, k) for k in ("num_classes", "input_shape", "mean", "std") if getattr(flags, k) is not None}
    if not isinstance(model, RobustModel):
        return RobustModel(model, ModelMeta(**given)) if given else RobustModel(model)
    meta = model.meta
    for name, value in given.items():
        own = getattr(meta, name)
        if own is not None and not _same(own, value):
            what = "normalises its inputs with" if name in ("mean", "std") else "says"
            raise UsageError(f"the {role} is a robkd model that already {what} {name} = {_show(own)}; {name}= says "
                             f"{_show(value)}: drop {name}= for it (its metadata carries the value)")
    missing = {k: v for k, v in given.items() if getattr(meta, k) is None}
    if not missing:
        return model
    import dataclasses

    new_meta = dataclasses.replace(meta, **missing)
    if any(k in missing for k in ("mean", "std", "input_shape")):  # the normalisation is built from these
        return RobustModel(model.net, new_meta)
    model.meta = new_meta
    return model


def _same(a: Sequence[float] | int | tuple, b: Sequence[float] | int | tuple) -> bool:
    """Equal values; sequences element-wise up to a relative 1e-6."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(abs(float(u) - float(v)) <= 1e-6 * max(1.0, abs(float(u))) for u, v in zip(a, b))
    return a == b


def _show(v: object) -> str:
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)
