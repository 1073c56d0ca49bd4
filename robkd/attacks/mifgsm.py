"""MI-FGSM (Dong et al. 2018): iterative FGSM with a momentum of L1-normalised gradients."""

from __future__ import annotations

import torch

from robkd.attacks._geometry import ascent_direction, per_sample, project
from robkd.attacks.base import Attack, AttackOutput, iterate_with_early_exit
from robkd.errors import UsageError
from robkd.types import Norm
from robkd.utils.validate import check_int


class MIFGSM(Attack):
    """Momentum iterative FGSM, spec ``mifgsm`` or ``mifgsm-<steps>``.

    Defaults (Dong et al.; ARD's evaluation uses 20 steps): ``steps=20``, step
    ``eps / steps``, decay ``mu = 1.0``; ``g <- mu * g + grad / mean|grad|``
    (per-sample L1 normalisation), ``x <- Proj(x + step * sign(g))`` (Linf) or
    ``step * g / ||g||_2`` (L2). No random start. Every iterate is checked and a
    sample is frozen at its first adversarial iterate (early exit).
    """

    name = "mifgsm"

    def __init__(
        self,
        norm: "Norm | str",
        eps: float,
        *,
        steps: int = 20,
        decay: float = 1.0,
        step_size: float | None = None,
        eot_iter: int = 1,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        super().__init__(norm, eps, seed=seed, batch_size=batch_size)
        self.steps = check_int(steps, "steps", 1)
        self.eot_iter = check_int(eot_iter, "eot_iter", 1)
        self.decay = float(decay)
        if not self.decay >= 0:
            raise UsageError(f"decay must be >= 0, got {decay!r}")
        self._step_size = None if step_size is None else float(step_size)
        if self._step_size is not None and not self._step_size >= 0:
            raise UsageError(f"step_size must be >= 0, got {step_size!r}")
        self.name = f"mifgsm-{self.steps}"
        self.cost = float(self.steps * self.eot_iter)

    @property
    def step_size(self) -> float:
        """The step size: the explicit one, else the default ``eps / steps`` (follows ``eps``)."""
        return self.eps / self.steps if self._step_size is None else self._step_size

    def _step(self, x_adv, grad, x0, eps_t, momentum):
        l1 = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
        momentum = self.decay * momentum + grad / l1
        return project(x_adv + self.step_size * ascent_direction(momentum, self.norm), x0, self.norm, eps_t), momentum

    def _perturb(self, model, x, y, target, generator) -> AttackOutput:
        best = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        idx = torch.arange(x.shape[0], device=x.device)
        iterate_with_early_exit(model, idx, x, y, target, x.clone(), per_sample(self.eps, x), steps=self.steps,
                                eot_iter=self.eot_iter, step_fn=self._step, best=best, found=found,
                                state=torch.zeros_like(x))
        return AttackOutput(best, found)
