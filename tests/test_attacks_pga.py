"""Tests of the PGD primitive ``projected_gradient_ascent`` (contract used by trainer and LLM)."""

from __future__ import annotations

import pytest
import torch

from robkd.attacks.pgd import projected_gradient_ascent
from robkd.errors import UsageError
from robkd.types import Norm


def _linear_loss(w):
    return lambda z: (z.flatten(1) * w.flatten()).sum(1)


def test_linf_linear_loss_reaches_the_analytic_maximum():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 4, 4, generator=g)
    w = torch.randn(1, 4, 4, generator=g)
    eps = 0.1
    out = projected_gradient_ascent(_linear_loss(w), x, norm=Norm.LINF, eps=eps, steps=5, step_size=0.05, random_start=None)
    expected = (x + eps * w.sign()).clamp(0, 1)  # the maximiser of a linear loss over box ∩ [0,1]
    torch.testing.assert_close(out, expected)


def test_l2_linear_loss_reaches_the_analytic_maximum():
    g = torch.Generator().manual_seed(1)
    x = 0.4 + 0.2 * torch.rand(3, 2, 3, 3, generator=g)  # far from the box faces
    w = torch.randn(2, 3, 3, generator=g)
    eps = 0.05
    out = projected_gradient_ascent(_linear_loss(w), x, norm="L2", eps=eps, steps=10, step_size=0.02, random_start=None)
    expected = x + eps * w / w.norm()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_matches_an_independent_hand_written_pgd_loop():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = lambda z: torch.nn.functional.cross_entropy(net(z), y, reduction="none")
    eps, alpha, steps = 0.2, 0.03, 7
    ours = projected_gradient_ascent(loss_fn, x, norm=Norm.LINF, eps=eps, steps=steps, step_size=alpha, random_start=None)
    ref = x.clone()
    for _ in range(steps):
        ref.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(ref).sum(), ref)
        ref = torch.min(torch.max(ref.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    torch.testing.assert_close(ours, ref)
    assert all(p.grad is None for p in net.parameters())


def test_feasibility_per_sample_eps_and_no_parameter_grads(trained_mlp, fmnist_test):
    x = fmnist_test.float_x(torch.arange(16))
    y = fmnist_test.y[:16]
    for p in trained_mlp.parameters():
        p.grad = None
    eps = torch.linspace(0.0, 0.3, 16)
    loss_fn = lambda z: torch.nn.functional.cross_entropy(trained_mlp(z), y, reduction="none")
    for norm in (Norm.LINF, Norm.L2):
        scale = 1.0 if norm is Norm.LINF else 5.0
        out = projected_gradient_ascent(loss_fn, x, norm=norm, eps=eps * scale, steps=5, step_size=eps * scale / 4,
                                        generator=torch.Generator().manual_seed(0))
        d = (out - x).flatten(1)
        n = d.abs().amax(1) if norm is Norm.LINF else d.norm(dim=1)
        assert bool((n <= eps * scale + 1e-6).all())
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert torch.equal(out[0], x[0])  # eps = 0 keeps the input
        # the attack increases the loss
        with torch.no_grad():
            assert float(loss_fn(out).sum()) > float(loss_fn(x).sum())
    assert all(p.grad is None for p in trained_mlp.parameters())


def test_random_starts_are_seeded_and_feasible():
    x = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    zero = lambda z: z.flatten(1).sum(1) * 0.0
    for start in ("uniform", "normal:0.001"):
        for norm in (Norm.LINF, Norm.L2):
            a = projected_gradient_ascent(zero, x, norm=norm, eps=0.1, steps=0, step_size=0.0, random_start=start,
                                          generator=torch.Generator().manual_seed(7))
            b = projected_gradient_ascent(zero, x, norm=norm, eps=0.1, steps=0, step_size=0.0, random_start=start,
                                          generator=torch.Generator().manual_seed(7))
            assert torch.equal(a, b) and not torch.equal(a, x)
            d = (a - x).flatten(1)
            n = d.abs().amax(1) if norm is Norm.LINF else d.norm(dim=1)
            assert bool((n <= 0.1 + 1e-6).all()) and float(a.min()) >= 0 and float(a.max()) <= 1


def test_return_best_keeps_the_highest_loss_iterate():
    # loss peaks at the first iterate and then decreases: last iterate is worse, best is x + step
    x = torch.full((2, 4), 0.5)
    loss_fn = lambda z: -((z - 0.55) ** 2).sum(1)  # maximum at 0.55; large steps overshoot and oscillate
    last = projected_gradient_ascent(loss_fn, x, norm=Norm.LINF, eps=0.3, steps=2, step_size=0.05, random_start=None)
    best = projected_gradient_ascent(loss_fn, x, norm=Norm.LINF, eps=0.3, steps=2, step_size=0.05, random_start=None, return_best=True)
    torch.testing.assert_close(best, torch.full((2, 4), 0.55))
    torch.testing.assert_close(last, torch.full((2, 4), 0.55))
    osc_best = projected_gradient_ascent(loss_fn, x, norm=Norm.LINF, eps=0.3, steps=2, step_size=0.08, random_start=None, return_best=True)
    osc_last = projected_gradient_ascent(loss_fn, x, norm=Norm.LINF, eps=0.3, steps=2, step_size=0.08, random_start=None)
    assert float(loss_fn(osc_best).sum()) >= float(loss_fn(osc_last).sum())
    torch.testing.assert_close(osc_best, torch.full((2, 4), 0.58))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps": -0.1},
        {"eps": float("nan")},
        {"steps": -1},
        {"steps": 2.5},
        {"random_start": "gaussian"},
        {"random_start": "normal:abc"},
        {"norm": "L7"},
        {"eps": torch.ones(3)},
    ],
)
def test_bad_inputs_raise_usage_error(kwargs):
    x = torch.rand(2, 4)
    args = dict(norm=Norm.LINF, eps=0.1, steps=1, step_size=0.01)
    args.update(kwargs)
    with pytest.raises(UsageError):
        projected_gradient_ascent(lambda z: z.sum(1), x, **args)


def test_input_outside_unit_box_and_bad_loss_shape_raise():
    with pytest.raises(UsageError):
        projected_gradient_ascent(lambda z: z.sum(1), torch.rand(2, 4) * 3, norm=Norm.LINF, eps=0.1, steps=1, step_size=0.01)
    with pytest.raises(UsageError):
        projected_gradient_ascent(lambda z: z.sum(), torch.rand(2, 4), norm=Norm.LINF, eps=0.1, steps=1, step_size=0.01)


@pytest.mark.parametrize("norm,start", [(Norm.LINF, "uniform"), (Norm.L2, "uniform"), (Norm.LINF, "normal:0.001")])
def test_batch_slices_draw_the_rows_of_the_whole_batch(norm, start):
    """Under DDP each rank draws the global batch's random starts and keeps its rows: the parts put together
    equal one process's starts, and the two ranks' starts differ."""
    from robkd.attacks._geometry import BatchSlice, random_start_point

    x = torch.rand(6, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    eps = torch.full((6, 1, 1, 1), 0.1)
    whole = random_start_point(x, norm, eps, start, torch.Generator().manual_seed(7))
    parts = [random_start_point(x[a:b], norm, eps[a:b], start, BatchSlice(torch.Generator().manual_seed(7), a, b, 6))
             for a, b in ((0, 3), (3, 6))]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(parts[0] - x[:3], parts[1] - x[3:])
    with pytest.raises(UsageError):
        random_start_point(x[:2], norm, eps[:2], start, BatchSlice(torch.Generator(), 0, 3, 6))
