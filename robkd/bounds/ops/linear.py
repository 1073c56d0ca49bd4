"""Affine bound operators: elementwise affine maps, reshapes, linear layers, convolutions (and average
pooling), sums of two traced tensors and concatenation. Each is exact under every method."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from robkd.bounds.ops.base import BoundOp, Bounds, as_float, tail_dims

class ElementwiseAffine(BoundOp):
    """``y = x * scale + shift`` elementwise (Normalize, BatchNorm in eval, +-*/ by constants)."""

    kind = "affine"

    def __init__(self, name: str, inp: str, shape: Sequence[int], scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__(name, [inp], shape)
        full = (1,) + self.out_shape
        self.scale = torch.broadcast_to(as_float(scale), full)[0].contiguous()
        self.shift = torch.broadcast_to(as_float(shift), full)[0].contiguous()

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
        bias = (A * self.shift).sum(dim=tail_dims(A, nd))
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
        self.weight = as_float(weight)
        self.bias = None if bias is None else as_float(bias)

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
            bias = (A * self.bias).sum(dim=tail_dims(A, len(self.out_shape)))
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
        self.weight = as_float(weight)
        self.bias = None if bias is None else as_float(bias)
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


class Concat(BoundOp):
    """Concatenation of traced tensors along a per-sample dimension ``dim`` (>= 1 in the batched tensor)."""

    kind = "concat"

    def __init__(self, name: str, inputs: Sequence[str], sizes: Sequence[int], dim: int, shape: Sequence[int]) -> None:
        super().__init__(name, inputs, shape)
        self.sizes = [int(s) for s in sizes]
        self.dim = int(dim)

    def forward(self, *xs):
        return torch.cat(xs, dim=self.dim)

    def interval(self, *bounds: Bounds) -> Bounds:
        return torch.cat([b[0] for b in bounds], dim=self.dim), torch.cat([b[1] for b in bounds], dim=self.dim)

    def backward(self, A, bounds, alpha=None):
        # A is (B|1, S, *out_shape): the batched dim ``dim`` is at position dim + 1 there
        return list(torch.split(A, self.sizes, dim=self.dim + 1)), None
