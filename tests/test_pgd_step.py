"""The fused Linf step of ``projected_gradient_ascent``: the same bits as the step written op by op, and a
non-finite gradient never moves the iterate."""

import torch
import torch.nn.functional as F

from robkd.attacks._geometry import ascent_direction, per_sample, project, random_start_point
from robkd.attacks.pgd import projected_gradient_ascent
from robkd.types import Norm


def _reference(loss_fn, x, eps, steps, alpha, start, gen, return_best=False):
    """The primitive as it was written before the fused step: one new tensor per operation."""
    eps_t, a = per_sample(eps, x), per_sample(alpha, x)
    x_adv = random_start_point(x, Norm.LINF, eps_t, start, gen)
    best, best_loss = (x_adv.clone() if return_best else None), None
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(x_adv)
            (g,) = torch.autograd.grad(loss.sum(), x_adv)
        x_adv = x_adv.detach()
        if return_best:
            lv = loss.detach()
            if best_loss is None:
                best_loss, best = lv.clone(), x_adv.clone()
            else:
                better = lv > best_loss
                best_loss = torch.where(better, lv, best_loss)
                best[better] = x_adv[better]
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        x_adv = project(x_adv + a * ascent_direction(g, Norm.LINF), x, Norm.LINF, eps_t)
    if not return_best:
        return x_adv
    with torch.no_grad():
        lv = loss_fn(x_adv)
    better = lv > best_loss
    best[better] = x_adv[better]
    return best


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))


def test_fused_linf_step_is_bit_identical_to_the_op_by_op_step():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(16, 1, 8, 8, generator=g)
    x[:4] = x[:4].round()  # pixels at 0 and 1: the [0,1] clamp is active
    y = torch.randint(0, 5, (16,), generator=g)
    model = _model(0)

    def loss_fn(z):
        return F.cross_entropy(model(z), y, reduction="none")

    eps_per_sample = torch.linspace(0.0, 0.3, 16)  # includes eps = 0
    for eps, alpha, start, best in [(0.1, 0.025, None, False), (8 / 255, 2 / 255, "uniform", False),
                                    (eps_per_sample, 0.05, "uniform", True), (0.2, eps_per_sample, None, True)]:
        ours = projected_gradient_ascent(loss_fn, x, norm=Norm.LINF, eps=eps, steps=7, step_size=alpha,
                                         random_start=start, generator=torch.Generator().manual_seed(1), return_best=best)
        ref = _reference(loss_fn, x, eps, 7, alpha, start, torch.Generator().manual_seed(1), return_best=best)
        assert torch.equal(ours, ref)


def test_a_broadcast_gradient_is_not_written_in_place():
    x = torch.full((3, 4), 0.5)
    out = projected_gradient_ascent(lambda z: z.sum(1), x, norm=Norm.LINF, eps=0.1, steps=3, step_size=0.05, random_start=None)
    assert torch.allclose(out, torch.full((3, 4), 0.6))


def test_a_non_finite_gradient_does_not_move_the_iterate_and_the_loss_input_is_left_alone():
    x = torch.full((2, 4), 0.5)
    seen = []

    def loss_fn(z):
        seen.append(z)
        w = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0], [1.0, -1.0, 1.0, -1.0]])
        return (z * w).sum(1)

    out = projected_gradient_ascent(loss_fn, x, norm=Norm.LINF, eps=0.1, steps=2, step_size=0.05, random_start=None)
    # sample 0: NaN/inf entries stay at x; the finite one ascends; sample 1 follows the sign of its weights
    assert torch.allclose(out, torch.tensor([[0.5, 0.5, 0.5, 0.6], [0.6, 0.4, 0.6, 0.4]]))
    assert torch.equal(seen[0].detach(), x)  # the iterate loss_fn saw was not overwritten by the step
