"""MILP exact verification: agrees with brute force on 2-D toys, sits between CROWN and attacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robkd.bounds import certify, margin_matrix
from robkd.bounds.milp import verify_milp
from robkd.errors import UsageError
from robkd.models import RobustModel
from robkd.types import ModelMeta


def toy(seed: int, hidden=(8, 8), residual: bool = False) -> RobustModel:
    torch.manual_seed(seed)
    layers = [nn.Linear(2, hidden[0]), nn.ReLU()]
    for a, b in zip(hidden[:-1], hidden[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(hidden[-1], 3))
    net = nn.Sequential(*layers)
    with torch.no_grad():  # sharper functions: decision boundaries inside [0,1]^2
        for layer in net:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(3.0)
    return RobustModel(net, ModelMeta(mean=(0.5,), std=(0.25,))).eval()


def grid_min_margins(model, x0, y, eps, n=301):
    """Dense-grid minimum of logit_y - logit_j over the clipped box, and the grid spacing."""
    lo, hi = (x0 - eps).clamp(0, 1), (x0 + eps).clamp(0, 1)
    g0 = torch.linspace(float(lo[0]), float(hi[0]), n)
    g1 = torch.linspace(float(lo[1]), float(hi[1]), n)
    pts = torch.cartesian_prod(g0, g1)
    with torch.no_grad():
        out = model(pts)
    marg = out[:, y : y + 1] - out
    return {j: float(marg[:, j].min()) for j in range(3) if j != y}, pts[marg[:, [j for j in range(3) if j != y]].min(1).values.argmin()]


def lipschitz(model) -> float:
    """Crude Linf->output Lipschitz bound of the margin (product of layer norms)."""
    L = 2.0 / 0.25
    for m in model.net:
        if isinstance(m, nn.Linear):
            L *= float(m.weight.detach().abs().sum(1).max())
    return L


def test_milp_matches_brute_force_on_2d_toys():
    statuses = []
    for seed in range(4):
        _check_toy(seed, statuses)
    assert {"verified", "falsified"} <= set(statuses)  # both verdicts occur across the toys


def _check_toy(seed, statuses):
    m = toy(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 2, generator=g)
    y = m(x).argmax(1)
    eps = 0.15
    outs = verify_milp(m, x, y, eps, time_limit=20, exhaustive=True)
    crown = certify(m, x, y, eps, method="crown")
    for i, o in enumerate(outs):
        assert o.status in ("verified", "falsified")
        grid, _ = grid_min_margins(m, x[i], int(y[i]), eps)
        h = 2 * eps / 300
        for k, j in enumerate([j for j in range(3) if j != int(y[i])]):
            exact = o.min_margins[j]
            # exact minimum <= every grid value, and within the grid's resolution of the grid minimum
            assert exact <= grid[j] + 1e-5
            assert exact >= grid[j] - lipschitz(m) * h
            # CROWN lower bound <= exact minimum
            assert float(crown.margin_lb[i, k]) <= exact + 1e-5
        assert (o.status == "verified") == (min(grid.values()) > 0)
        statuses.append(o.status)
        if o.status == "falsified":
            ce = o.counterexample
            assert ce is not None and (ce - x[i]).abs().max() <= eps + 1e-6 and ce.min() >= 0 and ce.max() <= 1
            assert int(m(ce.unsqueeze(0)).argmax(1)) != int(y[i])


def test_milp_between_crown_and_attack_on_deeper_net():
    m = toy(7, hidden=(16, 16, 8))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 2, generator=g)
    y = m(x).argmax(1)
    eps = 0.1
    outs = verify_milp(m, x, y, eps, time_limit=20, exhaustive=True)
    crown = certify(m, x, y, eps, method="crown")
    C = margin_matrix(y, 3)
    # best attack: PGD on each margin separately
    for i, o in enumerate(outs):
        others = [j for j in range(3) if j != int(y[i])]
        for k, j in enumerate(others):
            xa = x[i : i + 1].clone()
            for _ in range(50):
                xa.requires_grad_(True)
                val = (m(xa) * C[i, k]).sum()
                (gr,) = torch.autograd.grad(val, xa)
                with torch.no_grad():
                    xa = torch.min(torch.max(xa - eps / 10 * gr.sign(), x[i] - eps), x[i] + eps).clamp(0, 1)
            with torch.no_grad():
                attack = float((m(xa) * C[i, k]).sum())
            assert float(crown.margin_lb[i, k]) - 1e-5 <= o.min_margins[j] <= attack + 1e-5
        if crown.certified[i]:
            assert o.status == "verified"


def test_milp_skips_classes_verified_by_crown_and_reports_misclassified():
    m = toy(3)
    x = torch.rand(3, 2, generator=torch.Generator().manual_seed(9))
    y = m(x).argmax(1)
    y[0] = (y[0] + 1) % 3
    outs = verify_milp(m, x, y, 1e-4, time_limit=10)
    assert outs[0].status == "falsified" and outs[0].counterexample is not None
    for o in outs[1:]:
        assert o.status == "verified"
        assert o.min_margins == {}  # CROWN already proved every class at this tiny radius
    d = outs[0].to_dict()
    assert d["status"] == "falsified" and d["has_counterexample"]


def test_milp_bad_inputs():
    m = toy(0)
    x = torch.rand(2, 2)
    y = torch.tensor([0, 1])
    with pytest.raises(UsageError):
        verify_milp(m, x, y, 0.1, norm="L2")
    with pytest.raises(UsageError):
        verify_milp(m, x, y, -1.0)
    with pytest.raises(UsageError):
        verify_milp(m, x, y, 0.1, time_limit=0)


def test_milp_runs_in_eval_mode_and_restores_the_mode():
    import copy

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        net[1].running_mean.copy_(torch.randn(6))
        net[1].running_var.copy_(torch.rand(6) + 0.5)
    m = RobustModel(net, ModelMeta()).train()
    ref = copy.deepcopy(m).eval()
    x = torch.rand(4, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = ref(x).argmax(1)  # eval-mode predictions: all clean-correct
    stats = (net[1].running_mean.clone(), int(net[1].num_batches_tracked))
    got = verify_milp(m, x, y, 0.05, time_limit=10, exhaustive=True)
    want = verify_milp(ref, x, y, 0.05, time_limit=10, exhaustive=True)
    assert m.training and all(mod.training for mod in m.modules())
    assert torch.equal(net[1].running_mean, stats[0]) and int(net[1].num_batches_tracked) == stats[1]
    assert [o.status for o in got] == [o.status for o in want]
    assert all("misclassified" not in o.reason for o in got)  # the centre check used the running statistics
    for a, b in zip(got, want):
        assert a.min_margins.keys() == b.min_margins.keys()
        for j in a.min_margins:
            assert a.min_margins[j] == pytest.approx(b.min_margins[j], abs=1e-6)


class _ConvRes(nn.Module):
    """Conv + BatchNorm (eval) + residual add + strided conv + global average pool: every encoded op."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.c2 = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):  # noqa: ANN001, ANN201
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(h + self.c1(x))
        h = torch.relu(self.c2(h))
        return self.fc(self.pool(h).flatten(1))


def test_milp_on_a_conv_residual_net_lies_between_crown_and_sampled_corners():
    torch.manual_seed(1)
    net = _ConvRes()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 1.5)
        net.bn.weight.normal_()
        net.fc.weight.mul_(5)
    m = RobustModel(net, ModelMeta(input_shape=(1, 4, 4), num_classes=3, mean=(0.3,), std=(0.7,))).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = m(x).argmax(1)
    eps = 0.08
    outs = verify_milp(m, x, y, eps, time_limit=20, exhaustive=True)
    crown = certify(m, x, y, eps, method="crown")
    C = margin_matrix(y, 3)
    for i, o in enumerate(outs):
        assert o.status in ("verified", "falsified")
        others = [j for j in range(3) if j != int(y[i])]
        corners = (x[i] + (torch.rand(4000, 1, 4, 4, generator=g) * 2 - 1).sign() * eps).clamp(0, 1)
        with torch.no_grad():
            sampled = (m(corners).unsqueeze(1) * C[i]).sum(-1).min(0).values
        for k, j in enumerate(others):
            exact = o.min_margins[j]
            assert float(crown.margin_lb[i, k]) - 1e-4 <= exact <= float(sampled[k]) + 1e-4, (i, j)
        assert (o.status == "verified") == (min(o.min_margins.values()) > 0)


def test_milp_time_limit_gives_unknown():
    m = toy(3, hidden=(32, 32, 32))
    x = torch.tensor([[0.5, 0.5]])
    with torch.no_grad():
        y = m(x).argmax(1)
    out = verify_milp(m, x, y, 0.4, time_limit=1e-3)[0]
    assert out.status == "unknown"
