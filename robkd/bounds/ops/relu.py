"""The ReLU bound operator: IBP, and CROWN's triangle relaxation with an optimisable lower slope."""

from __future__ import annotations

import torch

from robkd.bounds.ops.base import BoundOp, tail_dims

class ReLU(BoundOp):
    """ReLU with the triangle relaxation (upper) and a slope-alpha lower line."""

    kind = "relu"
    is_linear = False

    def forward(self, x):
        return torch.relu(x)

    def interval(self, b):
        return b[0].clamp(min=0), b[1].clamp(min=0)

    @staticmethod
    def relaxation(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks and upper line: ``(unstable, active, up_slope, up_intercept)``."""
        unstable = (lo < 0) & (hi > 0)
        active = lo >= 0
        denom = torch.where(unstable, hi - lo, torch.ones_like(hi))
        up_slope = torch.where(unstable, hi / denom, active.to(hi.dtype))
        up_int = torch.where(unstable, -lo * hi / denom, torch.zeros_like(hi))
        return unstable, active, up_slope, up_int

    @staticmethod
    def default_alpha(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """CROWN's adaptive lower slope: 1 where ``hi >= -lo``, else 0."""
        return (hi >= -lo).to(hi.dtype)

    @staticmethod
    def relax(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CROWN's default relaxation as per-neuron tensors ``(lower slope, upper slope, upper intercept)``:
        stable neurons get their exact slope (1 active, 0 inactive) and no intercept."""
        unstable, active, up_slope, up_int = ReLU.relaxation(lo, hi)
        lo_slope = torch.where(unstable, ReLU.default_alpha(lo, hi), active.to(hi.dtype))
        return lo_slope.contiguous(), up_slope.contiguous(), up_int.contiguous()

    @staticmethod
    def backward_relaxed(
        A: torch.Tensor, lo_slope: torch.Tensor, slope_gap: torch.Tensor, up_int: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`backward` with a precomputed relaxation: ``lo_slope``, ``slope_gap = up_slope - lo_slope``
        and ``up_int`` (None when no neuron is unstable) shaped ``(B|P, *shape)``. Computes
        ``A * lo_slope + A_neg * slope_gap`` (= ``A_pos * lo_slope + A_neg * up_slope``) with clamps and
        products only (``torch.where`` with broadcasting is slow on CPU)."""
        flat = A.reshape(A.shape[:2] + (-1,))
        n = flat.shape[-1]
        ls, gap = lo_slope.reshape(-1, 1, n), slope_gap.reshape(-1, 1, n)
        neg = flat.clamp(max=0)
        new = (flat * ls).add_(neg * gap)
        new = new.reshape(new.shape[:2] + A.shape[2:])
        if up_int is None:
            return new, None
        bias = torch.matmul(neg, up_int.reshape(-1, n, 1)).squeeze(-1)
        return new, bias

    def backward(self, A, bounds, alpha=None):
        lo, hi = bounds[0]
        unstable, active, up_slope, up_int = (t.unsqueeze(1) for t in self.relaxation(lo, hi))
        lo_slope = self.default_alpha(lo, hi).unsqueeze(1) if alpha is None else alpha
        # stable neurons: the lower line is exact (slope 1 active, 0 inactive)
        lo_slope = torch.where(unstable, lo_slope, active.to(hi.dtype))
        A_pos, A_neg = A.clamp(min=0), A.clamp(max=0)
        new = A_pos * lo_slope + A_neg * up_slope
        bias = (A_neg * up_int).sum(dim=tail_dims(A, len(self.out_shape)))
        return [new], bias
