"""Max pooling: exact IBP, and the CROWN / alpha-CROWN relaxation of the LiRPA literature.

A window is *decided* on a set of inputs when one element's lower bound is at least every other
element's upper bound: the window's maximum is then that element everywhere on the set, and the
operator is linear there (lower = upper = that element). An undecided window is relaxed by

* lower: ``max_i x_i >= sum_i w_i x_i`` for any convex weights ``w`` over the window's elements
  (CROWN / DeepPoly: all weight on the element with the largest lower bound; alpha-CROWN optimises
  ``w``, kept on the simplex by clamping and renormalising);
* upper: ``max_i x_i <= max_i u_i``, the constant largest upper bound (DeepPoly's upper line).

Both are sound for every point of the input box; padding positions (``-inf`` in ``max_pool2d``) are
never selected and never weighted.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from robkd.bounds.ops.base import BoundOp, Bounds

# A max-pooling relaxation: (lower weights (B, C, k, L), upper weights (B, C, k, L), upper constant (B, C, L))
PoolRelaxation = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _pair2(v: "int | Sequence[int]") -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


class MaxPool2d(BoundOp):
    """2-D max pooling (kernel, stride, padding, dilation, ceil_mode) on ``(C, H, W)`` maps."""

    kind = "maxpool2d"
    supports_backward = True
    is_linear = False

    def __init__(self, name: str, inp: str, shape: Sequence[int], kwargs: dict, in_shape: Sequence[int] | None = None) -> None:
        super().__init__(name, [inp], shape)
        self.kwargs = dict(kwargs)
        self.in_shape = None if in_shape is None else tuple(int(s) for s in in_shape)
        self.k = _pair2(self.kwargs["kernel_size"])
        st = self.kwargs.get("stride")
        self.st = _pair2(st if st not in (None, [], ()) else self.kwargs["kernel_size"])
        self.pad = _pair2(self.kwargs.get("padding", 0))
        self.dil = _pair2(self.kwargs.get("dilation", 1))

    def forward(self, x):
        return F.max_pool2d(x, **self.kwargs)

    def interval(self, b):
        return self.forward(b[0]), self.forward(b[1])

    # ------------------------------------------------------------------ windows
    def _need(self) -> list[int]:
        """Rows/columns of the padded map the windows cover."""
        return [(o - 1) * s + d * (kk - 1) + 1 for o, s, d, kk in zip(self.out_shape[1:], self.st, self.dil, self.k)]

    def _windows(self, t: torch.Tensor, fill: float) -> torch.Tensor:
        """``(B, C, k, L)``: the elements of every pooling window of ``t`` (B, C, H, W), ``fill`` outside the map."""
        B, C, H, W = t.shape
        need = self._need()
        right = [max(0, n - size - p) for n, size, p in zip(need, (H, W), self.pad)]
        padded = F.pad(t.reshape(B * C, 1, H, W), (self.pad[1], right[1], self.pad[0], right[0]), value=fill)
        padded = padded[:, :, : need[0], : need[1]]
        cols = F.unfold(padded, self.k, dilation=self.dil, stride=self.st)  # (B*C, k, L)
        return cols.reshape(B, C, cols.shape[1], cols.shape[2])

    def _fold(self, cols: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """The adjoint of :meth:`_windows`: ``(N, C, k, L)`` window coefficients summed onto ``(N, C, H, W)``."""
        N, C = cols.shape[:2]
        need = self._need()
        out = F.fold(cols.reshape(N * C, cols.shape[2], cols.shape[3]), tuple(need), self.k, dilation=self.dil,
                     stride=self.st)
        extra = [max(0, p + size - n) for p, size, n in zip(self.pad, (H, W), need)]
        if extra[0] or extra[1]:
            out = F.pad(out, (0, extra[1], 0, extra[0]))
        out = out[:, :, self.pad[0] : self.pad[0] + H, self.pad[1] : self.pad[1] + W]
        return out.reshape(N, C, H, W)

    def _select(self, b: Bounds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per window: one-hot of the element with the largest lower bound ``(B, C, k, L)``, whether the window
        is decided ``(B, C, L)``, the largest upper bound ``(B, C, L)`` and the real (non-padding) elements
        ``(1, 1, k, L)``."""
        lo, hi = b
        lo_w = self._windows(lo, float("-inf"))
        hi_w = self._windows(hi, float("-inf"))
        ones = torch.ones((1, 1) + tuple(lo.shape[2:]), dtype=lo.dtype, device=lo.device)
        real = self._windows(ones, 0.0) > 0
        lo_sel, sel = lo_w.max(dim=2, keepdim=True)
        others = hi_w.scatter(2, sel, float("-inf")).amax(dim=2)
        decided = (lo_sel.squeeze(2) >= others) & torch.isfinite(lo_sel.squeeze(2))
        onehot = torch.zeros_like(lo_w).scatter_(2, sel, 1.0)
        return onehot, decided, hi_w.amax(dim=2), real

    # ------------------------------------------------------------------ decisions and relaxations
    def decided(self, b: Bounds) -> torch.Tensor:
        """``(B,)`` bool: every window is decided on the set the input bounds ``b`` enclose."""
        if b[0].dim() != 4:
            return torch.zeros(b[0].shape[0], dtype=torch.bool, device=b[0].device)
        return self._select(b)[1].flatten(1).all(1)

    def relax(self, lo: torch.Tensor, hi: torch.Tensor) -> PoolRelaxation:
        """CROWN's default relaxation from the input bounds: ``(lower weights, upper weights, upper constant)``
        (upper weights one-hot and constant 0 in decided windows, weights 0 and ``max u`` elsewhere)."""
        onehot, decided, umax, _ = self._select((lo, hi))
        d = decided.unsqueeze(2).to(lo.dtype)
        b_up = torch.where(decided, torch.zeros_like(umax), umax)
        return onehot, onehot * d, b_up

    def backward_relaxed(self, A: torch.Tensor, w_lo: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The backward step with a given relaxation: ``A`` (B|1, S, C, OH, OW) -> input coefficients
        (B, S, C, H, W) and bias (B, S); ``w_lo`` may be per specification ``(B, S, C, k, L)``."""
        H, W = self.in_shape[1:] if self.in_shape is not None else (None, None)
        if H is None:
            raise RuntimeError(f"MaxPool2d at {self.name} was built without its input shape")
        lead = A.shape[:2]
        C, L = w_up.shape[1], w_up.shape[3]
        Af = A.reshape(lead[0], lead[1], C, 1, L)
        pos, neg = Af.clamp(min=0), Af.clamp(max=0)
        lower = w_lo if w_lo.dim() == 5 else w_lo.unsqueeze(1)  # per-specification weights (alpha) or shared
        cols = pos * lower + neg * w_up.unsqueeze(1)  # (B, S, C, k, L)
        Bn = cols.shape[0]
        new = self._fold(cols.reshape(Bn * lead[1], C, cols.shape[3], L), H, W).reshape(Bn, lead[1], C, H, W)
        bias = (neg.reshape(lead[0], lead[1], C * L) * b_up.reshape(b_up.shape[0], 1, C * L)).sum(-1)
        return new, bias

    def backward(self, A, bounds, alpha=None):
        """CROWN (``alpha`` None) or alpha-CROWN (``alpha`` (B, S, C, k, L) raw lower weights, projected on the
        simplex of each undecided window; decided windows keep their exact element)."""
        b = bounds[0]
        if b is None:
            raise RuntimeError(f"MaxPool2d at {self.name} has no input bounds for the backward pass")
        if self.in_shape is None:
            self.in_shape = tuple(b[0].shape[1:])
        onehot, decided, umax, real = self._select(b)
        d = decided.unsqueeze(2).to(onehot.dtype)
        b_up = torch.where(decided, torch.zeros_like(umax), umax)
        w_up = onehot * d
        if alpha is None:
            new, bias = self.backward_relaxed(A, onehot, w_up, b_up)
            return [new], bias
        w = alpha.clamp(min=0) * real.to(alpha.dtype)
        total = w.sum(dim=3, keepdim=True)
        oh = onehot.unsqueeze(1)
        w = torch.where(total > 0, w / total.clamp(min=1e-12), oh)
        w = oh * d.unsqueeze(1) + w * (1 - d.unsqueeze(1))  # (B, S, C, k, L)
        new, bias = self.backward_relaxed(A, w, w_up, b_up)
        return [new], bias

    def default_alpha(self, b: Bounds, specs: int) -> torch.Tensor:
        """alpha-CROWN's starting weights ``(B, specs, C, k, L)``: CROWN's one-hot choice."""
        onehot = self._select(b)[0]
        return onehot.unsqueeze(1).expand((onehot.shape[0], specs) + tuple(onehot.shape[1:])).clone()
