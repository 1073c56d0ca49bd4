"""Max pooling under CROWN / alpha-CROWN: the relaxation on hand-derived values, soundness against an
independent exact MILP and dense sampling of the ball, and tightness against IBP."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import random_points
from robkd.bounds import certify, compute_bounds
from robkd.bounds.graph import BoundedModel
from robkd.bounds.ops import MaxPool2d
from robkd.models.wrapper import RobustModel
from robkd.types import ModelMeta, Norm

METHODS = ("ibp", "crown", "alpha-crown")


def test_relaxation_of_one_window_hand_derived():
    """Window x = (x1, x2, x3, x4) with x1 in [0, 1], x2 in [0.5, 2], x3 in [-1, 0.2], x4 in [-2, 0.1]:
    undecided (x2 has the largest lower bound 0.5 but x1 can reach 1). Lower line: y >= x2; upper: y <= 2."""
    op = MaxPool2d("p", "x", (1, 1, 1), dict(kernel_size=2, stride=2), (1, 2, 2))
    lo = torch.tensor([[[[0.0, 0.5], [-1.0, -2.0]]]])
    hi = torch.tensor([[[[1.0, 2.0], [0.2, 0.1]]]])
    (new,), bias = op.backward(torch.ones(1, 1, 1, 1, 1), [(lo, hi)])
    assert new.flatten().tolist() == [0.0, 1.0, 0.0, 0.0] and bias.item() == 0.0
    (new,), bias = op.backward(-torch.ones(1, 1, 1, 1, 1), [(lo, hi)])  # -y >= -2
    assert new.abs().sum().item() == 0.0 and bias.item() == -2.0
    # decided: x2 in [1.5, 2] is above every other upper bound -> y = x2 exactly, both directions
    lo2 = lo.clone()
    lo2[0, 0, 0, 1] = 1.5
    for sign in (1.0, -1.0):
        (new,), bias = op.backward(sign * torch.ones(1, 1, 1, 1, 1), [(lo2, hi)])
        assert new.flatten().tolist() == [0.0, sign, 0.0, 0.0] and bias.item() == 0.0
    assert op.decided((lo2, hi)).tolist() == [True] and op.decided((lo, hi)).tolist() == [False]
    # alpha-CROWN weights are projected on the simplex of the window: (1, 1, 0, 0) -> y >= (x1 + x2) / 2
    alpha = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4, 1)
    (new,), _ = op.backward(torch.ones(1, 1, 1, 1, 1), [(lo, hi)], alpha)
    assert new.flatten().tolist() == [0.5, 0.5, 0.0, 0.0]


def test_overlapping_padded_windows_decided_backward_is_the_exact_jacobian():
    """kernel 3, stride 2, padding 1 (timm ResNet stem) on well-separated values: every window decided,
    and the backward map equals the Jacobian of F.max_pool2d (overlapping windows add up)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randperm(2 * 5 * 5, generator=g).float().view(1, 2, 5, 5)
    lo, hi = x - 0.1, x + 0.1
    op = MaxPool2d("p", "x", (2, 3, 3), dict(kernel_size=3, stride=2, padding=1), (2, 5, 5))
    assert op.decided((lo, hi)).all()
    A = torch.randn(1, 4, 2, 3, 3, generator=g)
    (new,), bias = op.backward(A, [(lo, hi)])
    xr = x.clone().requires_grad_(True)
    for s in range(4):
        (grad,) = torch.autograd.grad((F.max_pool2d(xr, 3, 2, 1) * A[0, s]).sum(), xr)
        assert torch.allclose(new[0, s], grad[0]), s
    assert bias.abs().max().item() == 0.0


def _pool_net(seed: int, pool: nn.Module, relu_first: bool = True) -> RobustModel:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 2, 3, padding=1)]
    layers += [nn.ReLU(), pool] if relu_first else [pool, nn.ReLU()]
    body = nn.Sequential(*layers)
    n = body(torch.zeros(1, 1, 4, 4)).numel()
    net = nn.Sequential(body, nn.Flatten(), nn.Linear(n, 3))
    return RobustModel(net, ModelMeta(input_shape=(1, 4, 4))).eval()


def _exact_range(model: RobustModel, x: torch.Tensor, eps: float, c: torch.Tensor) -> tuple[float, float]:
    """Exact min and max of ``c @ logits`` over the Linf ball (clipped to [0,1]) by an independent MILP: each
    layer an affine expression of the variables; unstable ReLUs and undecided max-pooling windows get binaries."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    V = 400
    lo_v, hi_v, integ = np.zeros(V), np.zeros(V), np.zeros(V)
    rows, rhs, eqs = [], [], []
    n0 = x.numel()
    xf = x.flatten().double().numpy()
    lo_v[:n0], hi_v[:n0] = np.clip(xf - eps, 0, 1), np.clip(xf + eps, 0, 1)
    M = np.zeros((n0, V))
    M[:, :n0] = np.eye(n0)
    c0 = np.zeros(n0)
    nv = [n0]

    def new_var(lo, hi, binary=False):
        k = nv[0]
        nv[0] += 1
        lo_v[k], hi_v[k], integ[k] = lo, hi, float(binary)
        return k

    def box(M, c):
        return (np.minimum(M * lo_v, M * hi_v).sum(1) + c, np.maximum(M * lo_v, M * hi_v).sum(1) + c)

    def affine(layer, shape):
        with torch.no_grad():
            zero = layer(torch.zeros((1,) + shape, dtype=torch.float64))
            basis = torch.eye(int(np.prod(shape)), dtype=torch.float64).reshape((-1,) + shape)
            J = (layer(basis) - zero).reshape(basis.shape[0], -1).t().numpy()
        return J, zero.flatten().numpy(), tuple(zero.shape[1:])

    shape = tuple(x.shape[1:])
    layers = list(model.net[0]) + [model.net[1], model.net[2]]
    for layer in [copy.deepcopy(m).double() for m in layers]:
        if isinstance(layer, (nn.Conv2d, nn.Linear, nn.Flatten)):
            J, b, shape = affine(layer, shape)
            M, c0 = J @ M, J @ c0 + b
        elif isinstance(layer, nn.ReLU):
            l, u = box(M, c0)
            M2, c2 = M.copy(), c0.copy()
            for i in range(len(c0)):
                if u[i] <= 0:
                    M2[i], c2[i] = 0, 0
                elif l[i] < 0:
                    y, a = new_var(0, u[i]), new_var(0, 1, True)
                    r = M[i].copy(); r[y] -= 1; rows.append(r); rhs.append(-c0[i])  # z - y <= -c
                    r = -M[i].copy(); r[y] += 1; r[a] = -l[i]; rows.append(r); rhs.append(c0[i] - l[i])
                    r = np.zeros(V); r[y] = 1; r[a] = -u[i]; rows.append(r); rhs.append(0.0)
                    M2[i], c2[i] = 0, 0
                    M2[i, y] = 1
            M, c0 = M2, c2
        elif isinstance(layer, nn.MaxPool2d):
            l, u = box(M, c0)
            idx = torch.arange(len(c0), dtype=torch.float64).reshape((1,) + shape)
            pad = layer.padding
            win = F.unfold(F.pad(idx + 1, (pad, pad, pad, pad)).reshape(shape[0], 1, *np.add(shape[1:], 2 * pad)),
                           layer.kernel_size, stride=layer.stride).long() - 1  # (C, k, L), -1 = padding
            rows_out, c_out = [], []
            for ch in range(shape[0]):
                for w in range(win.shape[2]):
                    el = [int(e) for e in win[ch, :, w] if e >= 0]
                    top = max(u[e] for e in el)
                    m = new_var(max(l[e] for e in el), top)
                    ds = [new_var(0, 1, True) for _ in el]
                    for e, d in zip(el, ds):
                        r = M[e].copy(); r[m] -= 1; rows.append(r); rhs.append(-c0[e])  # z_e <= m
                        r = -M[e].copy(); r[m] += 1; r[d] = top - l[e]; rows.append(r); rhs.append(c0[e] + top - l[e])
                    eq = np.zeros(V); eq[ds] = 1; eqs.append(eq)
                    r = np.zeros(V); r[m] = 1; rows_out.append(r); c_out.append(0.0)
            M, c0 = np.array(rows_out), np.array(c_out)
            shape = (shape[0], win.shape[2])
    obj = c.double().numpy() @ M
    const = float(c.double().numpy() @ c0)
    cons = [LinearConstraint(np.array(rows), -np.inf, np.array(rhs))]
    if eqs:
        cons.append(LinearConstraint(np.array(eqs), 1, 1))
    out = []
    for sign in (1, -1):
        res = milp(sign * obj, integrality=integ, bounds=Bounds(lo_v, hi_v), constraints=cons)
        assert res.status == 0, res.message
        out.append(sign * res.fun + const)
    return out[0], out[1]


@pytest.mark.parametrize("pool,relu_first", [(nn.MaxPool2d(2), True), (nn.MaxPool2d(3, 2, 1), True),
                                             (nn.MaxPool2d(2), False)])
def test_bounds_never_cross_the_exact_milp_range(pool, relu_first):
    m = _pool_net(1, pool, relu_first)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 4, 4, generator=g)
    eps = 0.08
    C = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    bounds = {meth: compute_bounds(m, x, eps, method=meth, C=C, alpha_steps=15) for meth in METHODS}
    gaps = []
    for i in range(2):
        for s in range(2):
            lo, hi = _exact_range(m, x[i : i + 1], eps, C[s])
            # the MILP is itself checked: every sampled point lies in [lo, hi]
            pts = random_points(x[i : i + 1], eps, Norm.LINF, 300, i)
            with torch.no_grad():
                vals = m(pts.reshape(-1, 1, 4, 4)) @ C[s]
            assert lo <= vals.min().item() + 1e-5 and vals.max().item() <= hi + 1e-5
            for meth, (lb, ub) in bounds.items():
                assert lb[i, s].item() <= lo + 1e-5 and ub[i, s].item() >= hi - 1e-5, (meth, i, s)
            gaps.append((bounds["ibp"][0][i, s] - bounds["crown"][0][i, s]).item())
    assert all(a.item() >= b.item() - 1e-6 for a, b in zip(bounds["alpha-crown"][0].flatten(), bounds["crown"][0].flatten()))
    assert sum(gaps) <= 0  # CROWN's lower bounds never looser than IBP's (intersected), tighter on average


@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=3, stride=2, ceil_mode=True), dict(kernel_size=2, stride=1, dilation=2)])
def test_dense_sampling_stays_inside_the_bounds_and_crown_beats_ibp(kw):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(**kw), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.Flatten())
    n = net(torch.zeros(1, 2, 9, 9)).shape[1]
    net.append(nn.Linear(n, 5))
    m = RobustModel(net, ModelMeta(input_shape=(2, 9, 9))).eval()
    x = torch.rand(4, 2, 9, 9)
    eps = 0.03
    pts = random_points(x, eps, Norm.LINF, 400, 1)
    with torch.no_grad():
        vals = m(pts.reshape(-1, 2, 9, 9)).reshape(400, 4, 5)
    widths = {}
    for meth in METHODS:
        lb, ub = compute_bounds(m, x, eps, method=meth, alpha_steps=10)
        assert (vals >= lb - 1e-5).all() and (vals <= ub + 1e-5).all(), meth
        widths[meth] = (ub - lb).mean().item()
    assert widths["crown"] < widths["ibp"] and widths["alpha-crown"] <= widths["crown"] + 1e-6


def test_certify_runs_every_method_on_max_pooling_nets():
    """Used to fail under crown / alpha-crown ("MaxPool2d ... IBP only"); certificates are never broken."""
    m = _pool_net(4, nn.MaxPool2d(3, 2, 1))
    x = torch.rand(6, 1, 4, 4)
    with torch.no_grad():
        y = m(x).argmax(1)
    assert not BoundedModel(m, (1, 4, 4)).no_backward
    prev = None
    for meth in METHODS:
        res = certify(m, x, y, 0.02, method=meth)
        cert = res.certified
        if prev is not None:
            assert (cert >= prev).all()  # tighter methods certify at least as much
        prev = cert
        pts = random_points(x, 0.02, Norm.LINF, 200, 0)
        with torch.no_grad():
            preds = torch.stack([m(p).argmax(1) for p in pts])
        assert ((preds == y).all(0) | ~cert).all(), meth
