"""FGSM (Goodfellow et al.): one signed-gradient step of size eps (Linf) or eps along g/||g||_2 (L2)."""

from __future__ import annotations

import torch

from robkd.attacks._geometry import ascent_direction, per_sample, project
from robkd.attacks.base import Attack, AttackOutput, is_success, loss_gradient
from robkd.types import Norm
from robkd.utils.validate import check_int


class FGSM(Attack):
    """Fast gradient (sign) method, spec ``fgsm``: ``x + eps * sign(grad CE)`` projected to [0,1].

    No random start. Cost: one forward+backward pass plus one forward pass. The
    clean point counts as adversarial when it is already misclassified.
    """

    name = "fgsm"
    cost = 1.0

    def __init__(self, norm: "Norm | str", eps: float, *, eot_iter: int = 1, seed: int = 0, batch_size: int = 256) -> None:
        super().__init__(norm, eps, seed=seed, batch_size=batch_size)
        self.eot_iter = check_int(eot_iter, "eot_iter", 1)
        self.cost = float(self.eot_iter)

    def _perturb(self, model, x, y, target, generator) -> AttackOutput:
        grad, logits = loss_gradient(model, x, y, target, self.eot_iter)
        found = is_success(logits, y, target)
        eps_t = per_sample(self.eps, x)
        x_adv = project(x + eps_t * ascent_direction(grad, self.norm), x, self.norm, eps_t)
        with torch.no_grad():
            succ = is_success(model(x_adv), y, target)
        best = torch.where(found.view(-1, *([1] * (x.dim() - 1))), x, x_adv)
        return AttackOutput(best, found | succ)
