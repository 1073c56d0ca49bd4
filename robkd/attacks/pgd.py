"""Projected gradient ascent (the PGD primitive) and the PGD-k evaluation attack.

:func:`projected_gradient_ascent` is the generic inner maximiser shared by the
trainer (PGD-AT, TRADES, ARD) and the local-linearity estimator. :class:`PGD`
is the evaluation attack (cross-entropy, random start, restarts, early exit).
"""

from __future__ import annotations

from typing import Callable

import torch

from robkd.attacks._geometry import ascent_direction, per_sample, project, random_start_point
from robkd.attacks.base import Attack, AttackOutput, iterate_with_early_exit
from robkd.attacks.noise import SampleNoise
from robkd.errors import UsageError
from robkd.types import Norm
from robkd.utils.validate import check_int


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UsageError(f"steps must be an integer >= 0, got {steps!r}")
    return steps


def _check_unit_box(x: torch.Tensor, name: str = "x") -> None:
    if not torch.is_floating_point(x):
        raise UsageError(f"{name} must be a floating-point tensor in [0,1], got dtype {x.dtype}")
    if x.numel() and (not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise UsageError(f"{name} must lie in [0,1] pixel space (normalisation belongs inside the model)")


def projected_gradient_ascent(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    norm: "Norm | str",
    eps: "float | torch.Tensor",
    steps: int,
    step_size: "float | torch.Tensor",
    random_start: "str | None" = "uniform",
    generator: "torch.Generator | SampleNoise | None" = None,
    return_best: bool = False,
) -> torch.Tensor:
    """Maximise ``loss_fn`` over the ``norm``-ball of radius ``eps`` around ``x`` intersected with [0,1].

    ``loss_fn(x_adv)`` must return a per-sample loss ``(B,)``; each step is
    ``x_adv <- Proj(x_adv + step_size * d)`` with ``d = sign(g)`` (Linf) or
    ``g / ||g||_2`` (L2), ``g = autograd.grad(loss.sum(), x_adv)`` (input gradient
    only: parameter ``.grad`` is never touched). ``random_start``: ``"uniform"``
    (uniform in the Linf box / L2 ball), ``"normal:<std>"`` (``x + std * N(0, I)``,
    TRADES uses ``normal:0.001``) or ``None`` (start at ``x``); the start is
    projected too. ``eps`` and ``step_size`` may be floats or per-sample tensors
    ``(B,)``. The model's train/eval mode is the caller's business.

    Returns the detached last iterate (cost: ``steps`` forward+backward passes),
    or with ``return_best=True`` each sample's iterate of highest loss (one more
    forward pass). NaN gradients are treated as zero.
    """
    norm = Norm.parse(norm)
    steps = _check_steps(steps)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise UsageError("x must be a non-empty batched tensor (B, ...)")
    x = x.detach()
    _check_unit_box(x)
    eps_t = per_sample(eps, x, "eps")
    alpha = per_sample(step_size, x, "step_size")
    x_adv = random_start_point(x, norm, eps_t, random_start, generator)
    best = x_adv.clone() if return_best else None
    best_loss = None
    neg_eps = -eps_t

    def _loss(z: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(z)
        if not isinstance(loss, torch.Tensor) or loss.shape != (x.shape[0],):
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise UsageError(f"loss_fn must return a per-sample loss of shape ({x.shape[0]},), got {got}")
        return loss

    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = _loss(x_adv)
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        x_adv = x_adv.detach()
        if return_best:
            lv = loss.detach()
            if best_loss is None:
                best_loss, best = lv.clone(), x_adv.clone()
            else:
                better = lv > best_loss
                best_loss = torch.where(better, lv, best_loss)
                best[better] = x_adv[better]
        if norm is Norm.LINF:
            x_adv = _linf_step(x_adv, grad, x, alpha, neg_eps, eps_t)
        else:
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            x_adv = project(x_adv + alpha * ascent_direction(grad, norm), x, norm, eps_t)

    if not return_best:
        return x_adv.detach()
    with torch.no_grad():
        lv = _loss(x_adv).detach()
    if best_loss is None:
        return x_adv.detach()
    better = lv > best_loss
    best[better] = x_adv[better]
    return best.detach()


def _linf_step(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, neg_eps: torch.Tensor,
               eps: torch.Tensor) -> torch.Tensor:
    """One Linf step, ``project(x_adv + alpha * sign(nan_to_num(grad)), x, Linf, eps)``: the same operations in
    the same order, so the same bits, in one new tensor (the rest in place, on it and on ``grad`` when that is
    a dense buffer of its own) instead of one per operation. ``x_adv``, which ``loss_fn`` saw, is left as it
    is. A non-finite gradient entry gives no move there."""
    d = grad.nan_to_num_(0.0, 0.0, 0.0) if grad.is_contiguous() else torch.nan_to_num(grad, 0.0, 0.0, 0.0)
    d.sign_()
    # x + clamp((x_adv + alpha*d) - x, -eps, eps), clamped to [0,1]; alpha*d is exact (d in {-1, 0, 1})
    return torch.addcmul(x_adv, d, alpha).sub_(x).clamp_(neg_eps, eps).add_(x).clamp_(0.0, 1.0)


class PGD(Attack):
    """PGD-k on the cross-entropy (Madry et al.), with random start and restarts.

    Spec ``pgd-<steps>`` or ``pgd-<steps>x<restarts>`` (``pgd-20``, ``pgd-1000``,
    ``pgd-20x100``). Defaults follow the seed papers: ``steps=20``, step size
    ``2.5 * eps / steps``, one restart; the default start is uniform in the
    Linf box (Madry et al.), while for L2 the first restart starts at ``x`` and
    later restarts uniformly in the ball (a uniform start in a high-dimensional
    L2 ball lies near its surface, which measurably weakens a single restart).
    ``random_start`` overrides this for every restart. For
    stochastic models set ``eot_iter`` > 1 (gradient averaged over that many
    passes: Expectation over Transformation).

    Each iterate is checked for success with the logits of the gradient pass; a
    sample is kept (frozen at its first adversarial iterate) as soon as it is
    broken and dropped from the batch (early exit), so a sample is reported
    broken whenever any iterate of any restart broke it. Cost per restart:
    ``steps`` forward+backward passes to the input plus one forward pass.
    """

    name = "pgd"

    def __init__(
        self,
        norm: "Norm | str",
        eps: float,
        *,
        steps: int = 20,
        restarts: int = 1,
        step_size: float | None = None,
        random_start: "str | None" = "default",
        eot_iter: int = 1,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        super().__init__(norm, eps, seed=seed, batch_size=batch_size)
        self.steps = check_int(steps, "steps", 1)
        self.restarts = check_int(restarts, "restarts", 1)
        self.eot_iter = check_int(eot_iter, "eot_iter", 1)
        self._step_size = None if step_size is None else float(step_size)
        if self._step_size is not None and not self._step_size >= 0:
            raise UsageError(f"step_size must be >= 0, got {step_size!r}")
        if random_start not in (None, "none", "uniform", "default") and not str(random_start).startswith("normal:"):
            raise UsageError(f"unknown random_start {random_start!r}: use 'uniform', 'normal:<std>' or None")
        self.random_start = random_start
        self.name = f"pgd-{self.steps}" + (f"x{self.restarts}" if self.restarts > 1 else "")
        self.cost = float(self.steps * self.restarts * self.eot_iter)

    @property
    def step_size(self) -> float:
        """The step size: the explicit one, else the default ``2.5 * eps / steps`` (follows ``eps``)."""
        return 2.5 * self.eps / self.steps if self._step_size is None else self._step_size

    def _step(self, x_adv, grad, x0, eps_t, state):
        return project(x_adv + self.step_size * ascent_direction(grad, self.norm), x0, self.norm, eps_t), state

    def _perturb(self, model, x, y, target, generator) -> AttackOutput:
        best = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for restart in range(self.restarts):
            start = self.random_start
            if start == "default":
                start = None if (self.norm is Norm.L2 and restart == 0) else "uniform"
            idx = (~found).nonzero().flatten()
            if idx.numel() == 0:
                break
            x0, y0 = x[idx], y[idx]
            t0 = None if target is None else target[idx]
            eps_t = per_sample(self.eps, x0)
            noise = generator.subset(idx) if isinstance(generator, SampleNoise) else generator
            x_adv = random_start_point(x0, self.norm, eps_t, start, noise)
            iterate_with_early_exit(model, idx, x0, y0, t0, x_adv, eps_t, steps=self.steps, eot_iter=self.eot_iter,
                                    step_fn=self._step, best=best, found=found)
        return AttackOutput(best, found)
