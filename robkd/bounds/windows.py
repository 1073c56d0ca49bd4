"""Windowed ("patches") backward CROWN for intermediate neurons of convolutional layers.

The pre-activation of a neuron ``(c, i, j)`` of a convolution depends only on a
window of each earlier feature map: CROWN's backward coefficients for it are
zero outside that window. When the path from the convolution's input back to
the network input is a chain of convolutions, ReLUs and elementwise affine
operators, the coefficients of every backward problem are carried as a small
window ``(P, 2, C, h, w)`` anchored at ``(i * stride - offset, j * stride - offset)``
of the feature map instead of a dense ``(P, 2, C, H, W)`` tensor. Per-sample
quantities (ReLU relaxations, the input box) are cut into the same windows
(zero outside the map, which also drops the coefficients that fall on
zero padding). The result equals the dense backward pass up to float
round-off; it only skips the multiplications by zero.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from robkd.bounds import ops
from robkd.types import Norm


@dataclasses.dataclass
class Step:
    """One operator on the chain and the window grid on its *output* map."""

    op: ops.BoundOp
    h: int
    w: int
    stride: tuple[int, int]
    offset: tuple[int, int]


@dataclasses.dataclass
class Plan:
    """The chain below a convolution ``start`` and the window grid on the network input."""

    start: ops.Conv2d
    kernel: torch.Tensor  # (Cout, Cin, KH, KW): dilated, groups expanded to all input channels
    steps: list[Step]
    input_step: Step  # grid on the input (its ``op`` is ``start``; unused)
    positions: tuple[int, int]  # (Hs, Ws) of the start's output
    cache: dict = dataclasses.field(default_factory=dict)


_WINDOW_OPS = (ops.ReLU, ops.ElementwiseAffine, ops.Conv2d, ops.Reshape)


def make_plan(bm, start: ops.BoundOp, max_ratio: float = 0.5) -> Plan | None:
    """A window plan for the intermediate bounds of ``start`` (a Conv2d), or None when the path to the
    input is not a simple chain of supported operators or the windows would not be much smaller."""
    if not isinstance(start, ops.Conv2d) or len(start.in_shape) != 3:
        return None
    w = start.weight
    cout, cin_g, kh, kw = w.shape
    d = start.dilation
    KH, KW = d[0] * (kh - 1) + 1, d[1] * (kw - 1) + 1
    cin = start.in_shape[0]
    kernel = torch.zeros(cout, cin, KH, KW, dtype=w.dtype, device=w.device)
    per_group = cout // start.groups
    for g in range(start.groups):
        sl = slice(g * per_group, (g + 1) * per_group)
        kernel[sl, g * cin_g : (g + 1) * cin_g, :: d[0], :: d[1]] = w[sl]
    h, wd = KH, KW
    st, off = start.stride, start.padding
    steps: list[Step] = []
    window_cost = 0
    dense_cost = 0
    cur = start.inputs[0]
    while cur != bm.input_name:
        op = bm.ops[bm.index[cur]]
        if not isinstance(op, _WINDOW_OPS) or len(op.inputs) != 1 or len(op.out_shape) != 3:
            return None
        if isinstance(op, ops.Reshape) and op.in_shape != op.out_shape:
            return None
        steps.append(Step(op, h, wd, st, off))
        window_cost += op.out_shape[0] * h * wd
        dense_cost += math.prod(op.out_shape)
        if isinstance(op, ops.Conv2d):
            k = op.weight.shape[-2:]
            h = (h - 1) * op.stride[0] + op.dilation[0] * (k[0] - 1) + 1
            wd = (wd - 1) * op.stride[1] + op.dilation[1] * (k[1] - 1) + 1
            off = (off[0] * op.stride[0] + op.padding[0], off[1] * op.stride[1] + op.padding[1])
            st = (st[0] * op.stride[0], st[1] * op.stride[1])
        cur = op.inputs[0]
    if len(bm.input_shape) != 3:
        return None
    window_cost += bm.input_shape[0] * h * wd
    dense_cost += math.prod(bm.input_shape)
    if window_cost > max_ratio * dense_cost:
        return None
    return Plan(start, kernel, steps, Step(start, h, wd, st, off), tuple(start.out_shape[1:]))


def windows(t: torch.Tensor, step: Step, positions: tuple[int, int]) -> torch.Tensor:
    """Cut ``t`` (B, C, H, W) into the windows of every start position: (B, Hs*Ws, C, h, w), zero outside."""
    B, C, H, W = t.shape
    Hs, Ws = positions
    pads = []
    for size, n, s, o, k in ((W, Ws, step.stride[1], step.offset[1], step.w), (H, Hs, step.stride[0], step.offset[0], step.h)):
        right = (n - 1) * s - o + k - size
        pads += [o, max(0, right)]
    tp = F.pad(t, pads)
    u = tp.unfold(2, step.h, step.stride[0]).unfold(3, step.w, step.stride[1])[:, :, :Hs, :Ws]
    return u.permute(0, 2, 3, 1, 4, 5).reshape(B, Hs * Ws, C, step.h, step.w).contiguous()


def _conv_matrix(op: ops.Conv2d, step: Step) -> torch.Tensor | None:
    """The window-to-window map of ``op``'s backward pass as a dense matrix ``(C*h*w, Cin*h'*w')`` when a
    matrix product is cheaper than a transposed convolution (few input channels), else None."""
    c_out, c_in_g, kh, kw = op.weight.shape
    c_in = c_in_g * op.groups
    h2 = (step.h - 1) * op.stride[0] + op.dilation[0] * (kh - 1) + 1
    w2 = (step.w - 1) * op.stride[1] + op.dilation[1] * (kw - 1) + 1
    n_in, n_out = c_out * step.h * step.w, c_in * h2 * w2
    if n_out > 8 * c_in_g * kh * kw or n_in * n_out > (1 << 22):
        return None
    eye = torch.eye(n_in, device=op.weight.device).reshape(n_in, c_out, step.h, step.w)
    return F.conv_transpose2d(eye, op.weight, None, op.stride, 0, 0, op.groups, op.dilation).reshape(n_in, n_out)


class WindowPass:
    """Precomputed windows of one intermediate layer; :meth:`lower` solves the backward problems of a chunk."""

    def __init__(self, bm, plan: Plan, relax: dict[str, tuple], box: ops.Bounds, x: torch.Tensor, norm: Norm) -> None:
        self.plan, self.norm = plan, norm
        P = plan.positions
        self.L = P[0] * P[1]
        self.data: list[tuple] = []
        masked = False  # whether the coefficients are already zero outside the current map
        for step in plan.steps:
            op = step.op
            if isinstance(op, ops.ReLU):
                ls, gap, ui = relax[op.name]
                ui_w = None if ui is None else windows(ui, step, P)
                self.data.append((windows(ls, step, P), windows(gap, step, P), ui_w))
                masked = True
            elif isinstance(op, ops.ElementwiseAffine):
                self.data.append((windows(op.scale.unsqueeze(0), step, P)[0], windows(op.shift.unsqueeze(0), step, P)[0]))
                masked = True
            elif isinstance(op, ops.Conv2d):
                mask = None
                if not masked:
                    ones = torch.ones((1, 1) + op.out_shape[1:], device=x.device)
                    mask = windows(ones, step, P)[0]
                key = ("matrix", op.name, step.h, step.w)
                if key not in plan.cache:
                    plan.cache[key] = _conv_matrix(op, step)
                self.data.append((mask, plan.cache[key]))
                masked = False
            else:
                self.data.append(())
        s = plan.input_step
        ones = torch.ones((1, 1) + tuple(x.shape[2:]), device=x.device)
        self.in_mask = None if masked else windows(ones, s, P)[0]
        self.lo = windows(box[0], s, P)
        self.width = windows(box[1] - box[0], s, P)
        self.x = windows(x, s, P) if norm is Norm.L2 else None
        if norm is Norm.L2 and self.in_mask is None:
            self.in_mask = windows(ones, s, P)[0]

    def _gather(self, t: torch.Tensor, ps: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return t.reshape((-1,) + t.shape[2:])[ps * self.L + pos]

    def lower(self, ps: torch.Tensor, pn: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Lower bounds of ``+z`` and ``-z`` for the pre-activations ``z`` of the pairs (sample ``ps``,
        neuron ``pn``): (P, 2)."""
        plan = self.plan
        c, pos = pn // self.L, pn % self.L
        a = plan.kernel[c]
        A = torch.stack([a, -a], 1)
        n = A.shape[0]
        bias = torch.zeros(n, 2, device=A.device)
        if plan.start.bias is not None:
            b = plan.start.bias[c]
            bias = torch.stack([b, -b], 1)
        for step, data in zip(plan.steps, self.data):
            op = step.op
            if isinstance(op, ops.ReLU):
                ls, gap = self._gather(data[0], ps, pos), self._gather(data[1], ps, pos)
                ui = None if data[2] is None else self._gather(data[2], ps, pos)
                A, b = ops.ReLU.backward_relaxed(A, ls, gap, ui)
                if b is not None:
                    bias = bias + b
            elif isinstance(op, ops.ElementwiseAffine):
                sc, sh = data[0][pos], data[1][pos]
                flat = A.reshape(n, 2, -1)
                bias = bias + torch.matmul(flat, sh.reshape(n, -1, 1)).squeeze(-1)
                A = (flat * sc.reshape(n, 1, -1)).reshape(A.shape)
            elif isinstance(op, ops.Conv2d):
                mask, matrix = data
                if mask is not None:
                    A = A * mask[pos].unsqueeze(1)
                if op.bias is not None:
                    bias = bias + (A.sum(dim=(-2, -1)) * op.bias).sum(-1)
                c_in = op.weight.shape[1] * op.groups
                if matrix is not None:
                    k = op.weight.shape[-2:]
                    h2 = (A.shape[-2] - 1) * op.stride[0] + op.dilation[0] * (k[0] - 1) + 1
                    w2 = (A.shape[-1] - 1) * op.stride[1] + op.dilation[1] * (k[1] - 1) + 1
                    A = (A.reshape(n * 2, -1) @ matrix).reshape(n, 2, c_in, h2, w2)
                else:
                    A = F.conv_transpose2d(A.reshape((n * 2,) + A.shape[2:]), op.weight, None, op.stride, 0, 0,
                                           op.groups, op.dilation)
                    A = A.reshape((n, 2) + A.shape[1:])
        if self.in_mask is not None:
            A = A * self.in_mask[pos].unsqueeze(1)
        flat = A.reshape(n, 2, -1)
        lo, width = self._gather(self.lo, ps, pos).reshape(n, -1, 1), self._gather(self.width, ps, pos).reshape(n, -1, 1)
        # min over the box of a.x = a.lo + a_neg.(hi - lo)
        res = (torch.matmul(flat, lo) + torch.matmul(flat.clamp(max=0), width)).squeeze(-1) + bias
        if self.norm is Norm.L2:
            x0 = self._gather(self.x, ps, pos).reshape(n, -1, 1)
            ball = torch.matmul(flat, x0).squeeze(-1) - eps.view(-1, 1) * flat.norm(dim=-1) + bias
            res = torch.maximum(res, ball)
        return res
