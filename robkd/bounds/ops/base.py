"""The bound operator interface (:class:`BoundOp`) and helpers shared by the operator families."""

from __future__ import annotations

from typing import Sequence

import torch

Bounds = tuple[torch.Tensor, torch.Tensor]


def tail_dims(a: torch.Tensor, n: int) -> tuple[int, ...]:
    """The last ``n`` dimensions of ``a`` (the node's per-sample dims)."""
    return tuple(range(a.dim() - n, a.dim()))


def as_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, in its own floating dtype (float32 for integer tensors): bounds are computed in the
    model's dtype (float64 models get float64 bounds)."""
    t = t.detach()
    return t if t.is_floating_point() else t.float()


class BoundOp:
    """Base class of bound operators (one per traced graph node)."""

    kind = "op"
    supports_backward = True
    is_linear = True  # affine in its tensor inputs (used by the MILP encoder)

    def __init__(self, name: str, inputs: Sequence[str], out_shape: Sequence[int]) -> None:
        self.name = name
        self.inputs = list(inputs)
        self.out_shape = tuple(int(s) for s in out_shape)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def interval(self, *bounds: Bounds) -> Bounds:
        raise NotImplementedError

    def backward(
        self, A: torch.Tensor, bounds: Sequence[Bounds], alpha: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name} <- {self.inputs}, out={self.out_shape})"
