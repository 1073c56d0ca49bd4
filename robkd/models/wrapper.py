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
