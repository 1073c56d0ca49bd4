"""Windowed ("patches") backward CROWN for intermediate neurons of convolutional networks.

A pre-activation neuron ``(c, i, j)`` of a feature map depends only on a window of each earlier
feature map: CROWN's backward coefficients for it are zero outside that window. When every node
between the neuron's layer and the network input is a convolution, a ReLU, an elementwise affine
operator (BatchNorm, normalisation), a shape-preserving reshape or a residual ``Add`` (a DAG, as in
a ResNet), the coefficients of every backward problem are carried as a small window
``(P, 2, C, h, w)`` anchored at ``(i * stride - offset, j * stride - offset)`` of each node's map
instead of a dense ``(P, 2, C, H, W)`` tensor. A node read by several others (a residual branch
point) gets the union of the windows its readers need (same stride, so one anchor per position).
Per-sample quantities (ReLU relaxations, the input box) are cut into the same windows (zero outside
the map; coefficients that fall outside a map, i.e. on zero padding, are dropped). The result
equals the dense backward pass up to float round-off; it only skips the multiplications by zero.
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
    """One operator of the plan and the window grid on its *output* map."""

    op: ops.BoundOp
    h: int
    w: int
    stride: tuple[int, int]
    offset: tuple[int, int]


@dataclasses.dataclass
class Plan:
    """The operators below ``start`` (reverse topological order, ``start`` first) with their window grids,
    and the window grid on the network input."""

    start: ops.BoundOp
    steps: list[Step]
    input_step: Step
    positions: tuple[int, int]  # (Hs, Ws) of the start's output
    grids: dict[str, Step]  # node name -> its window grid (the input included)
    cache: dict = dataclasses.field(default_factory=dict)


_WINDOW_OPS = (ops.ReLU, ops.ElementwiseAffine, ops.Conv2d, ops.Reshape, ops.Add)


def _needed(op: ops.BoundOp, s: Step) -> tuple[int, int, tuple[int, int], tuple[int, int]]:
    """The window grid ``(h, w, stride, offset)`` on ``op``'s input(s) that its output window ``s`` reads."""
    if isinstance(op, ops.Conv2d):
        k = op.weight.shape[-2:]
        h = (s.h - 1) * op.stride[0] + op.dilation[0] * (k[0] - 1) + 1
        w = (s.w - 1) * op.stride[1] + op.dilation[1] * (k[1] - 1) + 1
        off = (s.offset[0] * op.stride[0] + op.padding[0], s.offset[1] * op.stride[1] + op.padding[1])
        return h, w, (s.stride[0] * op.stride[0], s.stride[1] * op.stride[1]), off
    return s.h, s.w, s.stride, s.offset


def _union(a: tuple | None, b: tuple) -> tuple | None:
    """The smallest grid covering both windows (same stride), or None when the strides differ."""
    if a is None:
        return b
    if a[2] != b[2]:
        return None
    off = (max(a[3][0], b[3][0]), max(a[3][1], b[3][1]))
    h = max(a[0] - a[3][0], b[0] - b[3][0]) + off[0]
    w = max(a[1] - a[3][1], b[1] - b[3][1]) + off[1]
    return h, w, a[2], off


def make_plan(bm, start: ops.BoundOp, max_ratio: float = 0.5) -> Plan | None:
    """A window plan for the intermediate bounds of ``start``, or None when some node below it is not
    supported (or has no ``(C, H, W)`` map), the strides disagree, or the windows would not be much
    smaller than the dense maps."""
    if len(start.out_shape) != 3 or len(bm.input_shape) != 3:
        return None
    need: dict[str, tuple | None] = {start.name: (1, 1, (1, 1), (0, 0))}
    steps: list[Step] = []
    window_cost = dense_cost = 0
    for op in reversed(bm.ops[: bm.index[start.name] + 1]):
        if op.name not in need:
            continue
        g = need.pop(op.name)
        if g is None or not isinstance(op, _WINDOW_OPS) or len(op.out_shape) != 3:
            return None
        if isinstance(op, ops.Reshape) and op.in_shape != op.out_shape:
            return None
        step = Step(op, *g)
        steps.append(step)
        window_cost += op.out_shape[0] * step.h * step.w
        dense_cost += math.prod(op.out_shape)
        req = _needed(op, step)
        for inp in op.inputs:
            need[inp] = _union(need.get(inp), req)
    g = need.pop(bm.input_name, None)
    if g is None or need:
        return None
    input_step = Step(start, *g)
    window_cost += bm.input_shape[0] * input_step.h * input_step.w
    dense_cost += math.prod(bm.input_shape)
    if window_cost > max_ratio * dense_cost:
        return None
    grids = {s.op.name: s for s in steps}
    grids[bm.input_name] = input_step
    return Plan(start, steps, input_step, tuple(start.out_shape[1:]), grids)


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


def _map_mask(shape: tuple[int, ...], step: Step, positions: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(L, 1, h, w): 1 where a window lies inside the map, 0 on padding."""
    ones = torch.ones((1, 1) + tuple(shape[-2:]), device=device)
    return windows(ones, step, positions)[0]


class WindowPass:
    """Precomputed windows of one intermediate layer; :meth:`lower` solves the backward problems of a chunk."""

    def __init__(self, bm, plan: Plan, relax: dict[str, tuple], box: ops.Bounds, x: torch.Tensor, norm: Norm) -> None:
        self.plan, self.norm, self.input_name = plan, norm, bm.input_name
        P = plan.positions
        self.L = P[0] * P[1]
        self.data: list[tuple] = []
        # whether the coefficients reaching a node are already zero outside its map: a ReLU's relaxation and a
        # BatchNorm's scale windows are zero there, a convolution's backward map is not; a convolution needs
        # masked coefficients (else off-map ones would leak into its input window), and so does the input
        clean: dict[str, bool] = {plan.start.name: True}
        for step in plan.steps:
            op = step.op
            masked = clean.pop(op.name)
            mask = None if masked or not isinstance(op, ops.Conv2d) else _map_mask(op.out_shape, step, P, x.device)
            out_clean = isinstance(op, (ops.ReLU, ops.ElementwiseAffine)) or (masked and not isinstance(op, ops.Conv2d))
            for inp in op.inputs:
                clean[inp] = clean.get(inp, True) and out_clean
            if isinstance(op, ops.ReLU):
                ls, gap, ui = relax[op.name]
                ui_w = None if ui is None else windows(ui, step, P)
                self.data.append((mask, windows(ls, step, P), windows(gap, step, P), ui_w))
            elif isinstance(op, ops.ElementwiseAffine):
                self.data.append((mask, windows(op.scale.unsqueeze(0), step, P)[0], windows(op.shift.unsqueeze(0), step, P)[0]))
            elif isinstance(op, ops.Conv2d):
                key = ("matrix", op.name, step.h, step.w)
                if key not in plan.cache:
                    plan.cache[key] = _conv_matrix(op, step)
                self.data.append((mask, plan.cache[key]))
            else:
                self.data.append((mask,))
        s = plan.input_step
        self.in_mask = None if clean.get(bm.input_name, False) else _map_mask(tuple(x.shape), s, P, x.device)
        self.lo = windows(box[0], s, P)
        self.width = windows(box[1] - box[0], s, P)
        self.x = windows(x, s, P) if norm is Norm.L2 else None

    def _gather(self, t: torch.Tensor, ps: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return t.reshape((-1,) + t.shape[2:])[ps * self.L + pos]

    def _place(self, pending: dict, name: str, A: torch.Tensor, req: tuple) -> None:
        """Add the window ``A`` (grid ``req`` on node ``name``) into the node's own (possibly larger) window."""
        g = self.plan.grids[name]
        dy, dx = g.offset[0] - req[3][0], g.offset[1] - req[3][1]
        if (dy, dx) != (0, 0) or A.shape[-2:] != (g.h, g.w):
            full = A.new_zeros(A.shape[:-2] + (g.h, g.w))
            full[..., dy : dy + A.shape[-2], dx : dx + A.shape[-1]] = A
            A = full
        pending[name] = pending[name] + A if name in pending else A

    def lower(self, ps: torch.Tensor, pn: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Lower bounds of ``+z`` and ``-z`` for the pre-activations ``z`` of the pairs (sample ``ps``,
        neuron ``pn``): (P, 2)."""
        plan = self.plan
        c, pos = pn // self.L, pn % self.L
        n = pn.shape[0]
        A = torch.zeros(n, 2, plan.start.out_shape[0], 1, 1, device=ps.device)
        rows = torch.arange(n, device=ps.device)
        A[rows, 0, c] = 1.0
        A[rows, 1, c] = -1.0
        pending = {plan.start.name: A}
        bias = torch.zeros(n, 2, device=A.device)
        for step, data in zip(plan.steps, self.data):
            op = step.op
            A = pending.pop(op.name)
            if data[0] is not None:
                A = A * data[0][pos].unsqueeze(1)
            outs = [A]
            if isinstance(op, ops.ReLU):
                ls, gap = self._gather(data[1], ps, pos), self._gather(data[2], ps, pos)
                ui = None if data[3] is None else self._gather(data[3], ps, pos)
                A, b = ops.ReLU.backward_relaxed(A, ls, gap, ui)
                outs = [A]
                if b is not None:
                    bias = bias + b
            elif isinstance(op, ops.ElementwiseAffine):
                sc, sh = data[1][pos], data[2][pos]
                flat = A.reshape(n, 2, -1)
                bias = bias + torch.matmul(flat, sh.reshape(n, -1, 1)).squeeze(-1)
                outs = [(flat * sc.reshape(n, 1, -1)).reshape(A.shape)]
            elif isinstance(op, ops.Conv2d):
                if op.bias is not None:
                    bias = bias + (A.sum(dim=(-2, -1)) * op.bias).sum(-1)
                c_in = op.weight.shape[1] * op.groups
                k = op.weight.shape[-2:]
                h2 = (A.shape[-2] - 1) * op.stride[0] + op.dilation[0] * (k[0] - 1) + 1
                w2 = (A.shape[-1] - 1) * op.stride[1] + op.dilation[1] * (k[1] - 1) + 1
                if data[1] is not None:
                    outs = [(A.reshape(n * 2, -1) @ data[1]).reshape(n, 2, c_in, h2, w2)]
                else:
                    new = F.conv_transpose2d(A.reshape((n * 2,) + A.shape[2:]), op.weight, None, op.stride, 0, 0,
                                             op.groups, op.dilation)
                    outs = [new.reshape((n, 2) + new.shape[1:])]
            elif isinstance(op, ops.Add):
                outs = [A, A * op.sign]
            req = _needed(op, step)
            for inp, a in zip(op.inputs, outs):
                self._place(pending, inp, a, req)
        A = pending.pop(self.input_name)
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
