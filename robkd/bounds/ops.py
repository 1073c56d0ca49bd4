"""Bound operators: one class per supported operation of a traced network.

Every operator works on per-sample tensors with a leading batch dimension and
offers three methods:

* ``forward(*xs)``: the exact value (used by tests and the MILP encoder);
* ``interval(*bounds)``: interval bound propagation (IBP), each bound a
  ``(lo, hi)`` pair of tensors shaped ``(B, *shape)``;
* ``backward(A, bounds, alpha)``: one step of the backward linear relaxation
  (CROWN). ``A`` has shape ``(B or 1, S, *out_shape)`` and represents the linear
  function ``sum(A * out)``; the method returns the coefficients for each
  tensor input (``None`` for inputs that receive nothing) and a bias ``(B|1, S)``
  so that ``sum(A * out) >= sum(A_i * in_i) + bias`` over the given input bounds
  (with equality for linear operators).

Linear operators also expose ``linear_part(x)`` (the operator without its
constant term) and ``constant()`` for the exact MILP encoding.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

Bounds = tuple[torch.Tensor, torch.Tensor]


def _tail_dims(a: torch.Tensor, n: int) -> tuple[int, ...]:
    """The last ``n`` dimensions of ``a`` (the node's per-sample dims)."""
    return tuple(range(a.dim() - n, a.dim()))


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


class ElementwiseAffine(BoundOp):
    """``y = x * scale + shift`` elementwise (Normalize, BatchNorm in eval, +-*/ by constants)."""

    kind = "affine"

    def __init__(self, name: str, inp: str, shape: Sequence[int], scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__(name, [inp], shape)
        full = (1,) + self.out_shape
        self.scale = torch.broadcast_to(scale.detach().float(), full)[0].contiguous()
        self.shift = torch.broadcast_to(shift.detach().float(), full)[0].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift

    def linear_part(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype)

    def constant(self) -> torch.Tensor:
        return self.shift

    def interval(self, b: Bounds) -> Bounds:
        lo, hi = b
        c, r = (lo + hi) / 2, (hi - lo) / 2
        c = c * self.scale + self.shift
        r = r * self.scale.abs()
        return c - r, c + r

    def backward(self, A, bounds, alpha=None):
        nd = len(self.out_shape)
        bias = (A * self.shift).sum(dim=_tail_dims(A, nd))
        return [A * self.scale], bias


class Reshape(BoundOp):
    """Flatten / view / reshape / Identity / Dropout (eval): a permutation-free reshape."""

    kind = "reshape"

    def __init__(self, name: str, inp: str, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        super().__init__(name, [inp], out_shape)
        self.in_shape = tuple(int(s) for s in in_shape)

    def forward(self, x):
        return x.reshape((x.shape[0],) + self.out_shape)

    def linear_part(self, x):
        return self.forward(x)

    def constant(self):
        return torch.zeros(self.out_shape)

    def interval(self, b):
        return self.forward(b[0]), self.forward(b[1])

    def backward(self, A, bounds, alpha=None):
        return [A.reshape(A.shape[:2] + self.in_shape)], None


class Linear(BoundOp):
    """``y = x W^T + b`` over the last dimension."""

    kind = "linear"

    def __init__(self, name: str, inp: str, shape: Sequence[int], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(name, [inp], shape)
        self.weight = weight.detach().float()
        self.bias = None if bias is None else bias.detach().float()

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def linear_part(self, x):
        return F.linear(x, self.weight.to(x.dtype))

    def constant(self):
        b = self.bias if self.bias is not None else torch.zeros(self.weight.shape[0])
        return torch.broadcast_to(b, self.out_shape)

    def interval(self, b):
        lo, hi = b
        c = F.linear((lo + hi) / 2, self.weight, self.bias)
        r = F.linear((hi - lo) / 2, self.weight.abs())
        return c - r, c + r

    def backward(self, A, bounds, alpha=None):
        new = A.matmul(self.weight)
        bias = None
        if self.bias is not None:
            bias = (A * self.bias).sum(dim=_tail_dims(A, len(self.out_shape)))
        return [new], bias


class Conv2d(BoundOp):
    """2-D convolution (stride, zero padding, dilation, groups, bias); also average pooling."""

    kind = "conv2d"

    def __init__(
        self,
        name: str,
        inp: str,
        in_shape: Sequence[int],
        shape: Sequence[int],
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> None:
        super().__init__(name, [inp], shape)
        self.in_shape = tuple(int(s) for s in in_shape)
        self.weight = weight.detach().float()
        self.bias = None if bias is None else bias.detach().float()
        self.stride, self.padding, self.dilation, self.groups = tuple(stride), tuple(padding), tuple(dilation), int(groups)
        k = self.weight.shape[-2:]
        self.output_padding = tuple(
            self.in_shape[1 + i] - ((self.out_shape[1 + i] - 1) * self.stride[i] - 2 * self.padding[i] + self.dilation[i] * (k[i] - 1) + 1)
            for i in range(2)
        )

    def _conv(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x):
        return self._conv(x, self.weight, self.bias)

    def linear_part(self, x):
        return self._conv(x, self.weight.to(x.dtype), None)

    def constant(self):
        b = self.bias if self.bias is not None else torch.zeros(self.weight.shape[0])
        return b.view(-1, 1, 1).expand(self.out_shape)

    def interval(self, b):
        lo, hi = b
        c = self._conv((lo + hi) / 2, self.weight, self.bias)
        r = self._conv((hi - lo) / 2, self.weight.abs(), None)
        return c - r, c + r

    def backward(self, A, bounds, alpha=None):
        lead = A.shape[:2]
        flat = A.reshape((-1,) + self.out_shape)
        if self.groups == 1 and self.in_shape[0] <= 3 and self.dilation == (1, 1):
            # few input channels (first layers): matmul + fold beats CPU conv_transpose2d
            cols = self.weight.reshape(self.weight.shape[0], -1).t() @ flat.reshape(flat.shape[0], self.out_shape[0], -1)
            new = F.fold(cols, self.in_shape[1:], self.weight.shape[-2:], padding=self.padding, stride=self.stride)
        else:
            new = F.conv_transpose2d(
                flat, self.weight, None, self.stride, self.padding, self.output_padding, self.groups, self.dilation
            )
        new = new.reshape(lead + self.in_shape)
        bias = None
        if self.bias is not None:
            bias = (A.sum(dim=(-1, -2)) * self.bias).sum(-1)
        return [new], bias


class Add(BoundOp):
    """Sum (or difference, ``sign=-1``) of two traced tensors (residual connections)."""

    kind = "add"

    def __init__(self, name: str, a: str, b: str, shape: Sequence[int], sign: float = 1.0) -> None:
        super().__init__(name, [a, b], shape)
        self.sign = float(sign)

    def forward(self, a, b):
        return a + self.sign * b

    def interval(self, ba, bb):
        if self.sign > 0:
            return ba[0] + bb[0], ba[1] + bb[1]
        return ba[0] - bb[1], ba[1] - bb[0]

    def backward(self, A, bounds, alpha=None):
        return [A, A * self.sign], None


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
        bias = (A_neg * up_int).sum(dim=_tail_dims(A, len(self.out_shape)))
        return [new], bias


class MaxPool2d(BoundOp):
    """Max pooling: monotone, so IBP is exact per window; no CROWN relaxation (unsupported there).

    Max pooling is only piecewise linear. A window is *decided* on a set of inputs when one
    element's lower bound is at least every other element's upper bound: the window's maximum is
    then that element everywhere on the set. :meth:`decided` tells, per sample, whether every window
    is decided; only then is the operator linear on the set, and :meth:`backward` (the exact
    selection) is defined.
    """

    kind = "maxpool2d"
    supports_backward = False
    is_linear = False

    def __init__(self, name: str, inp: str, shape: Sequence[int], kwargs: dict) -> None:
        super().__init__(name, [inp], shape)
        self.kwargs = kwargs

    def forward(self, x):
        return F.max_pool2d(x, **self.kwargs)

    def interval(self, b):
        return self.forward(b[0]), self.forward(b[1])

    def _windows(self, t: torch.Tensor, fill: float) -> torch.Tensor:
        """``(B, C, k, L)``: the elements of every pooling window of ``t`` (B, C, H, W), ``fill`` outside the map."""
        B, C, H, W = t.shape
        k = _pair2(self.kwargs["kernel_size"])
        st = _pair2(self.kwargs.get("stride") or self.kwargs["kernel_size"])
        pad = _pair2(self.kwargs.get("padding", 0))
        dil = _pair2(self.kwargs.get("dilation", 1))
        oh, ow = self.out_shape[1], self.out_shape[2]
        need = [(o - 1) * s + d * (kk - 1) + 1 for o, s, d, kk in zip((oh, ow), st, dil, k)]
        right = [max(0, n - size - p) for n, size, p in zip(need, (H, W), pad)]
        padded = F.pad(t.reshape(B * C, 1, H, W), (pad[1], right[1], pad[0], right[0]), value=fill)
        padded = padded[:, :, : need[0], : need[1]]
        cols = F.unfold(padded, k, dilation=dil, stride=st)  # (B*C, k, L)
        return cols.reshape(B, C, cols.shape[1], cols.shape[2])

    def _selection(self, b: Bounds) -> tuple[torch.Tensor, torch.Tensor]:
        """Per window the flat input index of the element with the largest lower bound ``(B, C, L)`` and
        whether the window is decided ``(B, C, L)``."""
        lo, hi = b
        if lo.dim() != 4 or len(self.out_shape) != 3:
            shape = (lo.shape[0], 1, 1)
            return torch.zeros(shape, dtype=torch.long, device=lo.device), torch.zeros(shape, dtype=torch.bool, device=lo.device)
        B, C, H, W = lo.shape
        lo_w = self._windows(lo, float("-inf"))
        hi_w = self._windows(hi, float("-inf"))
        index = torch.arange(H * W, device=lo.device, dtype=torch.float64).reshape(1, 1, H, W)
        idx_w = self._windows(index, -1.0)[0, 0].long()  # (k, L)
        lo_sel, sel = lo_w.max(dim=2, keepdim=True)
        others = hi_w.scatter(2, sel, float("-inf")).amax(dim=2)
        decided = lo_sel.squeeze(2) >= others
        k, L = idx_w.shape
        src = sel.squeeze(2)  # (B, C, L): kernel offset of the selected element
        flat = idx_w.t().reshape(1, 1, L, k).expand(B, C, L, k).gather(3, src.unsqueeze(-1)).squeeze(-1)
        decided &= flat >= 0  # a window made of padding only is never decided
        return flat, decided

    def decided(self, b: Bounds) -> torch.Tensor:
        """``(B,)`` bool: every window is decided on the set the input bounds ``b`` enclose."""
        _, dec = self._selection(b)
        return dec.flatten(1).all(1)

    def backward(self, A, bounds, alpha=None):
        """The exact backward map where every window is decided (raises otherwise: there is no relaxation)."""
        from robkd.errors import UnsupportedModelError

        b = bounds[0]
        if b is None:
            raise UnsupportedModelError(f"MaxPool2d at {self.name} has no input bounds for the backward pass",
                                        unsupported=[f"MaxPool2d at {self.name} (IBP only)"])
        flat, dec = self._selection(b)
        if not bool(dec.all()):
            raise UnsupportedModelError(
                f"MaxPool2d at {self.name}: no linear relaxation for undecided windows (IBP only)",
                unsupported=[f"MaxPool2d at {self.name} (IBP only)"],
            )
        lo = b[0]
        B, C, H, W = lo.shape
        L = flat.shape[-1]
        S = A.shape[1]
        A_b = A.expand((B,) + tuple(A.shape[1:])).reshape(B, S, C, L)
        new = torch.zeros(B, S, C, H * W, dtype=A.dtype, device=A.device)
        new.scatter_add_(3, flat.unsqueeze(1).expand(B, S, C, L), A_b)
        return [new.reshape(B, S, C, H, W)], None


def _pair2(v: "int | Sequence[int]") -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
