"""The input set of a bound: the Linf or L2 ball around each sample, intersected with [0,1].

:class:`InputSet` carries the centres, the per-sample radii, the norm and the [0,1]-clipped box;
:func:`concretize` turns a linear function of the input into its minimum over that set (the last
step of every CROWN bound).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from robkd.bounds.ops import Bounds
from robkd.errors import UsageError
from robkd.types import Norm


@dataclasses.dataclass
class InputSet:
    """The input set: centres ``x`` (B, ...), per-sample radii ``eps`` (B,), the norm and the
    [0,1]-clipped box ``[x - eps, x + eps]``."""

    x: torch.Tensor
    eps: torch.Tensor
    norm: Norm
    box: Bounds

    @classmethod
    def around(cls, x: torch.Tensor, eps: "float | torch.Tensor", norm: Norm) -> "InputSet":
        """The ball of radius ``eps`` (a float or per-sample radii, validated) around ``x``."""
        e = eps_tensor(eps, x)
        return cls(x, e, norm, input_box(x, e))

    def select(self, idx: torch.Tensor) -> "InputSet":
        """The input set of the samples ``idx`` only."""
        return InputSet(self.x[idx], self.eps[idx], self.norm, (self.box[0][idx], self.box[1][idx]))


def eps_tensor(eps: "float | torch.Tensor", x: torch.Tensor) -> torch.Tensor:
    """Per-sample radii ``(B,)`` from a float or a tensor; validated."""
    if isinstance(eps, torch.Tensor):
        e = eps.detach().to(x.device, torch.float32).flatten()
        if e.numel() == 1:
            e = e.expand(x.shape[0])
        if e.numel() != x.shape[0]:
            raise UsageError(f"eps has {e.numel()} values for {x.shape[0]} samples")
    else:
        if not isinstance(eps, (int, float)) or not math.isfinite(float(eps)):
            raise UsageError(f"eps must be a finite number >= 0, got {eps!r}")
        e = torch.full((x.shape[0],), float(eps), device=x.device)
    if not torch.isfinite(e).all() or (e < 0).any():
        raise UsageError("eps must be finite and >= 0")
    return e


def input_box(x: torch.Tensor, eps: torch.Tensor) -> Bounds:
    """The [0,1]-clipped box ``[x - eps, x + eps]`` (encloses both the Linf and the L2 ball)."""
    e = eps.view((-1,) + (1,) * (x.dim() - 1))
    return (x - e).clamp(0.0, 1.0), (x + e).clamp(0.0, 1.0)


def concretize(A: torch.Tensor | None, bias: torch.Tensor, inputs: InputSet) -> torch.Tensor:
    """min over the input set of ``sum(A * x) + bias``: (B, S).

    Linf: exact over the [0,1]-clipped box. L2: the dual-norm bound over the
    ball, intersected with the box bound (both are sound; the larger is kept).
    """
    B = inputs.x.shape[0]
    if A is None:
        return bias.expand(B, bias.shape[1]).clone()
    A = A.reshape(A.shape[0], A.shape[1], -1)
    lo, hi = inputs.box
    lo, hi = lo.reshape(B, -1, 1), hi.reshape(B, -1, 1)
    box_lb = (A.clamp(min=0) @ lo + A.clamp(max=0) @ hi).squeeze(-1) + bias
    if inputs.norm is Norm.LINF:
        return box_lb
    x0 = inputs.x.reshape(B, -1, 1)
    ball = (A @ x0).squeeze(-1) - inputs.eps.view(B, 1) * A.norm(dim=-1) + bias
    return torch.maximum(box_lb, ball)
