"""Affordable full CROWN (issue 16): chunked intermediate problems, windows across BatchNorm and residual adds.

The bounds must not depend on the chunk size, must equal the plain reference CROWN pass
(tests/crown_reference.py) to 1e-5, must never exceed the exact MILP minimum, and the deadline must stop
a long pass between chunks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robkd.bounds import BoundedModel, margin_matrix, ops, windows
from robkd.bounds.graph import DeadlineExceeded
from robkd.bounds.inputset import InputSet
from robkd.models import RobustModel
from robkd.types import ModelMeta, Norm

from crown_reference import reference_bounds
from helpers import make_net, randomise_bn


class _Block(nn.Module):
    """A ResNet basic block (conv-bn-relu-conv-bn + shortcut, 1x1 stride-2 projection when downsampling)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + self.short(x))


def _resnet(seed: int) -> RobustModel:
    """A tiny CIFAR-style ResNet: stem conv-bn-relu, an identity block, a downsampling block, pool, linear."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), _Block(4, 4, 1),
                        _Block(4, 6, 2), nn.AvgPool2d(4), nn.Flatten(), nn.Linear(6 * 2 * 2, 4))
    randomise_bn(net, torch.Generator().manual_seed(seed))
    meta = ModelMeta(input_shape=(3, 16, 16), num_classes=4, mean=(0.5,) * 3, std=(0.25,) * 3)
    return RobustModel(net, meta).eval()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    scale = max(1.0, float(b.abs().max()))
    return bool(((a - b).abs() <= rel * scale + 1e-6).all())


def _inputs(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n,) + shape, generator=g)
    x[0] = 0.0  # a ball touching the boundary of [0,1]
    return x


def test_windows_cross_batchnorm_and_residual_adds():
    bm = BoundedModel(_resnet(0), (3, 16, 16))
    planned = {name: windows.make_plan(bm, bm.ops[bm.index[name]]) for name in bm.relu_inputs}
    adds = [n for n in planned if isinstance(bm.ops[bm.index[n]], ops.Add)]
    bns = [n for n in planned if isinstance(bm.ops[bm.index[n]], ops.ElementwiseAffine)]
    assert adds and bns
    assert any(planned[n] is not None for n in adds), "no window plan through a residual add"
    assert any(planned[n] is not None for n in bns), "no window plan starting at a BatchNorm"
    plan = next(planned[n] for n in adds if planned[n] is not None)
    # a branch point (read by the block and its shortcut) gets one window covering both readers
    readers: dict[str, int] = {}
    for s in plan.steps:
        for i in s.op.inputs:
            readers[i] = readers.get(i, 0) + 1
    assert any(k > 1 for k in readers.values())


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_resnet_fast_equals_reference_and_chunk_size_does_not_matter(norm):
    m = _resnet(1)
    x = _inputs(3, (3, 16, 16), 5)
    eps = torch.tensor([0.01, 0.02, 0.005]) * (5 if norm is Norm.L2 else 1)
    C = margin_matrix(torch.tensor([0, 1, 2]), 4)
    bm = BoundedModel(m, (3, 16, 16))
    with torch.no_grad():
        lb, ub, nb = bm.bounds(x, eps, norm=norm, C=C)
        problems = bm.crown_problems
        lb_r, ub_r, nb_r = reference_bounds(bm, x, eps, norm=norm, C=C)
        tiny = BoundedModel(m, (3, 16, 16))
        tiny.chunk_elements = 4096  # a few problems per chunk (the default holds thousands)
        lb_t, ub_t, nb_t = tiny.bounds(x, eps, norm=norm, C=C)
    assert problems > 0
    assert _close(lb, lb_r) and _close(ub, ub_r), float((lb - lb_r).abs().max())
    assert _close(lb_t, lb) and _close(ub_t, ub)
    for name in nb_r:
        assert _close(nb[name][0], nb_r[name][0]) and _close(nb[name][1], nb_r[name][1]), name
        assert _close(nb_t[name][0], nb[name][0]) and _close(nb_t[name][1], nb[name][1]), name
    # not vacuous: CROWN tightened some ReLU input below its IBP bounds
    ibp = bm.intermediate_bounds(InputSet.around(x, eps, norm), False)
    assert any(bool(((nb[k][1] - nb[k][0]) < (ibp[k][1] - ibp[k][0]) - 1e-6).any()) for k in bm.relu_inputs)


def test_dense_path_chunking_equals_reference():
    """Nodes without a window plan (a plain MLP) use dense coefficients one sample at a time."""
    m = make_net("mlp", 3)
    x = _inputs(4, (2, 8, 8), 1)
    bm = BoundedModel(m, (2, 8, 8))
    bm.chunk_elements = 8 * 4 * 128  # a few problems per chunk
    with torch.no_grad():
        lb, ub, _ = bm.bounds(x, 0.05)
        lb_r, ub_r, _ = reference_bounds(bm, x, 0.05)
    assert _close(lb, lb_r) and _close(ub, ub_r)


def test_batchnorm_after_the_first_conv_is_exact_and_skipped():
    """IBP is exact for an elementwise affine map of an exact layer: no CROWN problem is spent there."""
    bm = BoundedModel(_resnet(0), (3, 16, 16))
    first_bn = next(op for op in bm.ops if isinstance(op, ops.ElementwiseAffine) and op.name in bm.relu_inputs)
    assert first_bn.name not in bm.crown_targets(Norm.LINF)
    assert first_bn.name in bm.crown_targets(Norm.L2)


def test_crown_never_exceeds_exact_milp_minimum_on_a_tiny_resnet():
    from robkd.bounds.milp import verify_milp

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, 1, 1), nn.ReLU(), _Block(2, 2, 1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    randomise_bn(net, torch.Generator().manual_seed(0))
    m = RobustModel(net, ModelMeta(input_shape=(1, 4, 4), num_classes=3)).eval()
    x = _inputs(3, (1, 4, 4), 2)
    with torch.no_grad():
        y = m(x).argmax(1)
    outs = verify_milp(m, x, y, 0.05, time_limit=20, exhaustive=True)
    bm = BoundedModel(m, (1, 4, 4))
    for i, o in enumerate(outs):
        with torch.no_grad():
            lb, _, _ = bm.bounds(x[i : i + 1], 0.05, C=margin_matrix(y[i : i + 1], 3))
        others = [j for j in range(3) if j != int(y[i])]
        for k, j in enumerate(others):
            if j in o.min_margins:
                assert float(lb[0, k]) <= o.min_margins[j] + 1e-4


def test_deadline_stops_the_intermediate_pass():
    bm = BoundedModel(_resnet(0), (3, 16, 16))
    inputs = InputSet.around(_inputs(2, (3, 16, 16), 0), 0.05, Norm.LINF)
    bm.deadline = 0.0  # long past
    with pytest.raises(DeadlineExceeded):
        bm.intermediate_bounds(inputs, True)
    bm.deadline = None
    bm.intermediate_bounds(inputs, True)  # and runs without one
