"""Fast bound paths against the plain reference: windowed/relaxed intermediate CROWN, certify early exits,
skip masks, certify_radii."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robkd.bounds import BoundedModel, certify, certify_radii, compute_bounds, margin_matrix, ops, windows
from robkd.errors import UsageError
from robkd.models import RobustModel
from robkd.types import ModelMeta, Norm

from crown_reference import reference_bounds, reference_certify
from helpers import make_net, random_points


def _conv_net(kind: str, seed: int) -> RobustModel:
    """Conv nets that exercise the windowed path: stride/padding/dilation/groups, BatchNorm, conv->conv
    without a ReLU between, average pooling, and a 3-channel input."""
    torch.manual_seed(seed)
    if kind == "small":  # cnn_small-like
        net = nn.Sequential(nn.Conv2d(1, 6, 4, 2, 1), nn.ReLU(), nn.Conv2d(6, 8, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(8 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 4))
        shape = (1, 16, 16)
    elif kind == "medium":  # BatchNorm, conv -> conv without ReLU, dilation, groups, avgpool
        net = nn.Sequential(
            nn.Conv2d(3, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 6, 3, 1, 2, dilation=2), nn.Conv2d(6, 8, 3, 2, 1, groups=2), nn.ReLU(),
            nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 3 * 3, 4),
        )
        shape = (3, 12, 12)
        g = torch.Generator().manual_seed(seed)
        bn = net[1]
        bn.running_mean.copy_(torch.randn(6, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(6, generator=g) + 0.5)
    else:  # pragma: no cover
        raise ValueError(kind)
    meta = ModelMeta(input_shape=shape, num_classes=4, mean=(0.45,) * shape[0], std=(0.3,) * shape[0])
    return RobustModel(net, meta).eval()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    scale = max(1.0, float(b.abs().max()))
    return bool(((a - b).abs() <= rel * scale + 1e-6).all())


CASES = [("mlp", make_net, (2, 8, 8)), ("cnn", make_net, (2, 8, 8)), ("resnet", make_net, (2, 8, 8)),
         ("small", _conv_net, (1, 16, 16)), ("medium", _conv_net, (3, 12, 12))]


@pytest.mark.parametrize("kind,factory,shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_fast_intermediate_equals_reference(kind, factory, shape, norm):
    for seed in range(2):
        m = factory(kind, seed)
        g = torch.Generator().manual_seed(10 + seed)
        x = torch.rand((5,) + shape, generator=g)
        x[0] = 0.0  # ball touching the boundary of [0,1]
        eps = torch.tensor([0.02, 0.05, 0.01, 0.08, 0.03]) * (4 if norm is Norm.L2 else 1)
        bm = BoundedModel(m, shape)
        C = torch.randn(5, 3, 4 if kind in ("small", "medium") else 3, generator=g)
        with torch.no_grad():
            lb, ub, nb = bm.bounds(x, eps, norm=norm, C=C)
            lb_r, ub_r, nb_r = reference_bounds(bm, x, eps, norm=norm, C=C)
        assert _close(lb, lb_r) and _close(ub, ub_r), (kind, float((lb - lb_r).abs().max()))
        for name in nb_r:
            assert _close(nb[name][0], nb_r[name][0]) and _close(nb[name][1], nb_r[name][1]), name
        # not vacuous: CROWN tightened some intermediate bound below IBP's
        ibp = bm.intermediate_bounds(_ctx(x, eps, norm), False)
        widths = [(nb[k][1] - nb[k][0], ibp[k][1] - ibp[k][0]) for k in bm.relu_inputs]
        assert any(bool((w < wi - 1e-6).any()) for w, wi in widths), kind


def _ctx(x, eps, norm):
    from robkd.bounds.inputset import InputSet

    return InputSet.around(x, eps, norm)


def test_window_plan_used_for_conv_layers():
    # issue 16: windows also start at BatchNorm-after-conv nodes (and cross residual adds), not only at convs
    for kind, shape, n_plans in (("medium", (3, 12, 12), 2), ("small", (1, 16, 16), 2)):
        bm = BoundedModel(_conv_net(kind, 0), shape)
        plans = {bm.ops[bm.index[name]]: windows.make_plan(bm, bm.ops[bm.index[name]]) for name in bm.relu_inputs}
        assert sum(p is not None for p in plans.values()) == n_plans, plans
        assert all(p is None for op, p in plans.items() if isinstance(op, ops.Linear))
        if kind == "medium":
            assert any(p is not None for op, p in plans.items() if isinstance(op, ops.ElementwiseAffine))


def test_windows_match_explicit_slicing():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 7, 6, generator=g)
    step = windows.Step(op=None, h=4, w=3, stride=(2, 3), offset=(1, 2))
    w = windows.windows(t, step, (4, 2))
    assert w.shape == (2, 8, 3, 4, 3)
    for i in range(4):
        for j in range(2):
            for a in range(4):
                for b in range(3):
                    r, c = i * 2 - 1 + a, j * 3 - 2 + b
                    want = t[:, :, r, c] if 0 <= r < 7 and 0 <= c < 6 else torch.zeros(2, 3)
                    assert torch.equal(w[:, i * 2 + j, :, a, b], want)


def test_relaxed_relu_backward_equals_plain():
    g = torch.Generator().manual_seed(1)
    lo = torch.randn(3, 4, 5, generator=g)
    hi = lo + torch.rand(3, 4, 5, generator=g) * 2
    A = torch.randn(3, 6, 4, 5, generator=g)
    op = ops.ReLU("r", ["z"], (4, 5))
    new, bias = op.backward(A, [(lo, hi)])
    ls, us, ui = ops.ReLU.relax(lo, hi)
    new2, bias2 = ops.ReLU.backward_relaxed(A, ls, us - ls, ui)
    assert torch.allclose(new[0], new2, atol=1e-6) and torch.allclose(bias, bias2, atol=1e-5)


def _assert_unstable_equal_up_to_rounding(m, x, y, eps, got, want, tol=1e-4):
    """Unstable-ReLU sets of the fast and the reference bound pass agree neuron by neuron, except for
    neurons whose reference bound lies within float rounding of zero (the two passes round differently,
    and the trained weights differ slightly between CPUs, so such a neuron may be unstable in one path
    only); certify's per-sample counts (``got`` fast, ``want`` reference) differ by at most that many.

    A near-zero bound is not always rare: over Fashion-MNIST's black background every sample sees the
    same constant pre-activation at a given channel, so one bias within ``tol`` of zero makes hundreds of
    borderline neurons. The per-neuron comparison stays strict on all the others."""
    bm = BoundedModel(m, tuple(x.shape[1:]))
    C = margin_matrix(y, 10)
    with torch.no_grad():
        _, _, nb_ref = reference_bounds(bm, x, eps, C=C, upper=False)
        _, _, nb_fast = bm.bounds(x, eps, C=C, upper=False)
    B = x.shape[0]
    borderline = torch.zeros(B, dtype=torch.long)
    for name in bm.relu_inputs:
        lo, hi = nb_ref[name]
        near = (lo.abs() <= tol) | (hi.abs() <= tol)
        borderline += near.reshape(B, -1).sum(1)
        unstable_ref = (lo < 0) & (hi > 0)
        unstable_fast = (nb_fast[name][0] < 0) & (nb_fast[name][1] > 0)
        assert not ((unstable_ref != unstable_fast) & ~near).any(), name
    # not vacuous: nearly every neuron is compared strictly
    assert int(borderline.sum()) <= 0.02 * bm.total_relus * B
    diff = (got - want).abs()
    assert (diff <= borderline).all(), (diff.tolist(), borderline.tolist())


@pytest.fixture(scope="module")
def cnn_slice(trained_cnn, fmnist_test):
    return trained_cnn, fmnist_test.float_x(slice(0, 48)), fmnist_test.y[:48]


@pytest.mark.parametrize("eps", [0.005, 0.03])
def test_certify_early_exit_matches_reference(cnn_slice, eps):
    m, x, y = cnn_slice
    x, y = x[:32], y[:32]
    fast = certify(m, x, y, eps)
    ref = reference_certify(m, x, y, eps, early_exit=False)
    assert fast.certified.tolist() == ref.certified.tolist()
    assert fast.status == ref.status
    # full CROWN (no early exit) equals the reference pass
    full = certify(m, x, y, eps, early_exit=False)
    assert _close(full.margin_lb, ref.margin_lb)
    _assert_unstable_equal_up_to_rounding(m, x, y, eps, full.unstable, ref.unstable)
    # region statistics do not depend on the early exit: every sample gets CROWN intermediate bounds
    _assert_unstable_equal_up_to_rounding(m, x, y, eps, fast.unstable, ref.unstable)
    assert fast.linear_region.tolist() == ref.linear_region.tolist()
    # the cheaper statistics from the deciding bounds only ever over-count
    loose = certify(m, x, y, eps, region_stats=False)
    assert (loose.unstable >= fast.unstable).all() and (loose.unstable > fast.unstable).any()
    # early-exited margins are sound lower bounds; the IBP-decided ones still certify
    C = margin_matrix(y, 10)
    with torch.no_grad():
        for p in random_points(x, eps, Norm.LINF, 20, 3):
            assert ((m(p).unsqueeze(1) * C).sum(-1) >= fast.margin_lb - 1e-4).all()
    assert set(fast.decided_by) <= {"ibp", "crown-ibp", "crown", "counterexample", "not-requested", "misclassified"}
    # every sample decided by a counterexample really is misclassified at some point of the ball:
    # the reference never certifies it
    cx = torch.tensor([d == "counterexample" for d in fast.decided_by])
    assert not (ref.certified & cx).any()
    if eps == 0.03:
        assert cx.any() and any(d == "crown" for d in fast.decided_by)


def test_skip_mask_does_not_change_other_samples(cnn_slice):
    m, x, y = cnn_slice
    skip = torch.zeros(48, dtype=torch.bool)
    skip[::3] = True
    for early in (True, False):
        base = certify(m, x, y, 0.02, early_exit=early)
        part = certify(m, x, y, 0.02, early_exit=early, skip=skip)
        keep = ~skip
        assert torch.equal(part.certified[keep], base.certified[keep])
        assert torch.allclose(part.margin_lb[keep], base.margin_lb[keep], atol=1e-6)
        assert torch.equal(part.unstable[keep], base.unstable[keep])
        assert [s for s, k in zip(part.status, keep) if k] == [s for s, k in zip(base.status, keep) if k]
        assert not part.certified[skip].any()
        assert all(s in ("skipped", "falsified") for s, k in zip(part.status, skip) if k)
    assert part.summary()["skipped"] == sum(s == "skipped" for s in part.status) > 0
    with pytest.raises(UsageError):
        certify(m, x, y, 0.02, skip=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(UsageError):
        certify(m, x, y, 0.02, skip=torch.zeros(48))


def test_certify_radii_consistent_with_single_radius(cnn_slice):
    m, x, y = cnn_slice
    radii = [0.005, 0.03, 0.015]
    res = certify_radii(m, x, y, radii)
    assert [r.eps for r in res] == radii
    for r, eps in zip(res, radii):
        single = certify(m, x, y, eps)
        # inherited certificates are sound; wherever the sample was bounded again, results agree
        assert (single.certified <= r.certified).all()
        fresh = torch.tensor([d != "larger-radius" for d in r.decided_by])
        assert torch.equal(r.certified[fresh], single.certified[fresh])
        # region statistics are this radius' own, inherited certificate or not (rounding aside)
        assert torch.equal(r.linear_region, single.linear_region)
        assert int((r.unstable - single.unstable).abs().sum()) <= 0.001 * int(single.unstable.sum()) + 2
    by_eps = {r.eps: r for r in res}
    assert (by_eps[0.03].certified <= by_eps[0.015].certified).all()
    assert (by_eps[0.015].certified <= by_eps[0.005].certified).all()
    inherited = [d == "larger-radius" for d in by_eps[0.005].decided_by]
    assert any(inherited) and all(by_eps[0.005].certified[torch.tensor(inherited)])
    # the largest radius is computed from scratch
    assert "larger-radius" not in by_eps[0.03].decided_by
    with pytest.raises(UsageError):
        certify_radii(m, x, y, [])
    with pytest.raises(UsageError):
        certify_radii(m, x, y, [0.01, -1.0])


def test_compute_bounds_fast_equals_reference_on_trained_cnn(cnn_slice):
    m, x, _ = cnn_slice
    lb, ub = compute_bounds(m, x[:16], 0.02)
    bm = BoundedModel(m, (1, 28, 28))
    with torch.no_grad():
        lb_r, ub_r, _ = reference_bounds(bm, x[:16], 0.02)
    assert _close(lb, lb_r) and _close(ub, ub_r)
