"""Local linearity measure: properties of the estimator, checked against independent computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robkd.analysis.llm import local_linearity, local_linearity_report
from robkd.errors import UsageError
from robkd.types import Norm


def _remainder(model: nn.Module, x1: torch.Tensor, y1: int, points: torch.Tensor) -> torch.Tensor:
    """|CE(f(z)) - CE(f(x)) - (z - x).g| at many points z of one sample, computed independently."""
    xs = x1.unsqueeze(0).clone().requires_grad_(True)
    ce0 = F.cross_entropy(model(xs), torch.tensor([y1]))
    (g,) = torch.autograd.grad(ce0, xs)
    with torch.no_grad():
        ce = F.cross_entropy(model(points), torch.full((points.shape[0],), y1), reduction="none")
        lin = ((points - x1) * g).flatten(1).sum(1)
        return (ce - ce0.detach() - lin).abs()


def _tanh_net(seed: int = 0, k: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, k)).double()
    with torch.no_grad():
        net[0].weight.mul_(4.0)
    return net.eval()


def _affine_relu_net(margin: float) -> nn.Module:
    """A ReLU net whose hidden biases are huge and positive: affine on [0,1]^4 (no ReLU ever switches).

    Its last bias makes class 2 win by about ``margin`` (label 0 is then confidently wrong).
    """
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        net[0].bias.fill_(100.0)
        out = net(torch.full((1, 4), 0.5, dtype=torch.float64))[0]
        net[2].bias.add_(-out)  # logits ~0 at the centre
        net[2].bias[2] += margin
    return net.eval()


def test_affine_logits_in_saturated_regime_give_zero_llm_while_curved_model_does_not():
    x = torch.rand(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    y = torch.zeros(6, dtype=torch.long)
    affine = _affine_relu_net(margin=60.0)
    # check the premise independently: no hidden pre-activation is anywhere near 0 on [0,1]^4
    w, b = affine[0].weight.detach(), affine[0].bias.detach()
    assert float((b - w.abs().sum(1)).min()) > 0
    v_aff = local_linearity(affine, x, y, 0.1, steps=20, restarts=2)
    # CE = z_2 - z_0 + log(1 + sum exp(z_j - z_2)): affine up to exp(-margin) on the ball
    assert float(v_aff.max()) < 1e-10

    curved = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        torch.manual_seed(4)
        curved[0].weight.normal_(0, 5.0)
        curved[0].bias.copy_(-(curved[0].weight @ torch.full((4,), 0.5, dtype=torch.float64)))  # kinks near the centre
    v_cur = local_linearity(curved, x, y, 0.1, steps=20, restarts=2)
    assert float(v_cur.min()) > 1e-3


def test_affine_logits_not_saturated_llm_is_the_ce_curvature_within_closed_form_bound():
    # A network affine on the ball does NOT have LLM 0 in general: CE (log-sum-exp) is curved.
    # Taylor: r(e) = 1/2 (We)^T H (We) with 0 <= H <= 1/2 I, so 0 <= LLM <= 1/4 max ||We||_2^2.
    affine = _affine_relu_net(margin=0.0)
    x = torch.full((3, 4), 0.5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    eps = 0.2
    v = local_linearity(affine, x, y, eps, steps=30, restarts=2)
    W = (affine[2].weight @ affine[0].weight).detach()  # the affine map's linear part
    # max of ||We||_2^2 over the Linf box is attained at a vertex: enumerate all 16
    verts = torch.cartesian_prod(*[torch.tensor([-eps, eps], dtype=torch.float64)] * 4)
    upper = 0.25 * float(((verts @ W.T) ** 2).sum(1).max())
    assert float(v.min()) > 0.0
    assert float(v.max()) <= upper + 1e-12


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_llm_close_to_and_never_above_brute_force_grid_max_2d(norm):
    net = _tanh_net()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 2, dtype=torch.float64, generator=g) * 0.7 + 0.15
    x[0] = torch.tensor([0.02, 0.5], dtype=torch.float64)  # near the box edge: the box constraint matters
    y = torch.tensor([0, 1, 2, 0, 1])
    eps = 0.12
    v = local_linearity(net, x, y, eps, norm=norm, steps=40, restarts=3)
    lin = torch.linspace(-eps, eps, 481, dtype=torch.float64)
    grid = torch.cartesian_prod(lin, lin)
    if norm is Norm.L2:
        grid = grid[grid.norm(dim=1) <= eps]
    spacing = 2 * eps / 480
    for i in range(x.shape[0]):
        pts = x[i] + grid
        pts = pts[((pts >= 0) & (pts <= 1)).all(1)]
        brute = float(_remainder(net, x[i], int(y[i]), pts).max())
        # an estimate from below can't beat the dense grid except by the grid's discretisation error
        assert float(v[i]) <= brute + 50 * spacing**2 + 1e-9
        assert float(v[i]) >= 0.9 * brute


def test_llm_is_at_least_value_at_random_points_of_the_ball(trained_mlp, fmnist_test):
    x = fmnist_test.float_x(torch.arange(6))
    y = fmnist_test.y[:6]
    eps = 0.1
    v = local_linearity(trained_mlp, x, y, eps, steps=10)
    g = torch.Generator().manual_seed(5)
    for i in range(x.shape[0]):
        pts = (x[i] + (torch.rand((64,) + tuple(x.shape[1:]), generator=g) * 2 - 1) * eps).clamp(0, 1)
        rnd = float(_remainder(trained_mlp, x[i], int(y[i]), pts).max())
        assert float(v[i]) >= rnd - 1e-5


def test_trivial_cases_and_determinism():
    net = _tanh_net()
    x = torch.rand(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0])
    assert torch.equal(local_linearity(net, x, y, 0.0), torch.zeros(4, dtype=torch.float64))
    # no steps, no random start: only e = 0 is examined, where the remainder is 0
    assert torch.equal(local_linearity(net, x, y, 0.1, steps=0, random_start=None), torch.zeros(4, dtype=torch.float64))
    a = local_linearity(net, x, y, 0.1, seed=7)
    b = local_linearity(net, x, y, 0.1, seed=7)
    assert torch.equal(a, b)
    # more restarts can only add candidates (same seed: the first restart is identical)
    c = local_linearity(net, x, y, 0.1, seed=7, restarts=3)
    assert bool((c >= a).all())
    # batching does not change the per-sample gradient (no batch-mean 1/B factor)
    d = local_linearity(net, x, y, 0.1, steps=0, random_start=None, batch_size=1)
    assert torch.equal(d, torch.zeros(4, dtype=torch.float64))


def test_eval_mode_restored_and_no_parameter_grads():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    net.train()
    stats = net[2].running_mean.clone()
    x = torch.rand(5, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 0, 1])
    v = local_linearity(net, x, y, 0.05, steps=5)
    assert net.training
    assert torch.equal(net[2].running_mean, stats)  # eval mode: BN statistics untouched
    assert all(p.grad is None for p in net.parameters())
    assert v.shape == (5,)


def test_report_is_json_and_consistent():
    net = _tanh_net()
    x = torch.rand(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0])
    rep = local_linearity_report({"teacher": net, "student": _tanh_net(1)}, x, y, [1 / 255, 0.1], steps=5)
    json.dumps(rep)
    assert rep["estimate"] == "lower" and "from below" in rep["note"]
    entry = rep["models"]["student"]["1/255"]
    direct = local_linearity(_tanh_net(1), x, y, 1 / 255, steps=5)
    assert entry["per_sample"] == pytest.approx(direct.tolist())
    assert entry["mean"] == pytest.approx(float(direct.mean()))
    assert math.isfinite(rep["models"]["teacher"]["0.1"]["median"])


def test_bad_input_raises_usage_error():
    net = _tanh_net()
    x = torch.rand(3, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(UsageError):
        local_linearity(net, x, y, -0.1)
    with pytest.raises(UsageError):
        local_linearity(net, x, y, float("nan"))
    with pytest.raises(UsageError):
        local_linearity(net, x, y, 0.1, steps=-1)
    with pytest.raises(UsageError):
        local_linearity(net, x, y, 0.1, restarts=0)
    with pytest.raises(UsageError):
        local_linearity(net, x, y, 0.1, step_size=-1.0)
    with pytest.raises(UsageError):
        local_linearity(net, x * 3 + 1, y, 0.1)
    with pytest.raises(UsageError):
        local_linearity(net, x, y[:2], 0.1)
    with pytest.raises(UsageError):
        local_linearity(net, x, torch.tensor([0, 1, 5]), 0.1)
    with pytest.raises(UsageError):
        local_linearity("not a model", x, y, 0.1)
    with pytest.raises(UsageError):
        local_linearity(net, x, y, 0.1, norm="L7")


def test_saturated_network_is_one_linear_region_and_has_zero_llm():
    """One saturated network, both views: certify finds every ball in one linear region (all ReLUs stable,
    so the logits are affine) AND the LLM is ~0. Both are needed: CE is nonlinear in the logits, so a net
    affine on the ball has LLM ~0 only when its softmax is saturated (here: a margin of 60 logits)."""
    import copy

    from robkd.bounds import certify

    net = _affine_relu_net(margin=60.0)
    x = torch.rand(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 0.6 + 0.2
    eps = 0.1
    res = certify(copy.deepcopy(net).float(), x.float(), torch.full((5,), 2, dtype=torch.long), eps, early_exit=False)
    assert res.linear_region_fraction == 1.0 and (res.unstable == 0).all()
    assert res.certified.all()  # large margins: class 2 wins on every ball
    for label in (2, 0):  # the winning class and a confidently wrong one (CE ~ z_2 - z_0, affine)
        v = local_linearity(net, x, torch.full((5,), label, dtype=torch.long), eps, steps=20, restarts=2)
        assert float(v.max()) < 1e-8, label
    # the same net without saturation is still affine on the ball but its LLM is clearly positive
    flat = _affine_relu_net(margin=0.0)
    assert float(local_linearity(flat, x, torch.zeros(5, dtype=torch.long), eps, steps=20).min()) > 1e-6
