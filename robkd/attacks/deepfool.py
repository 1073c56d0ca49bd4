"""DeepFool (Moosavi-Dezfooli et al. 2016), Linf and L2, evaluated at a fixed radius."""

from __future__ import annotations

import torch

from robkd.attacks._geometry import per_sample, project
from robkd.attacks.base import Attack, AttackOutput, is_success
from robkd.errors import UsageError
from robkd.types import Norm
from robkd.utils.logits import predict
from robkd.utils.validate import check_int


class DeepFool(Attack):
    """Untargeted DeepFool, spec ``deepfool``; minimal-perturbation search then projection to the ball.

    Defaults (paper / reference implementations): ``steps=50`` iterations,
    ``overshoot=0.02``, the ``candidates=10`` classes with the highest clean
    logits. Each iteration linearises ``f_k - f_y`` for the candidate classes
    and steps to the closest linearised boundary (dual norm: L1 for Linf, L2
    for L2). The path is kept in [0,1]; the final point is projected onto the
    eps-ball and re-checked, so the attack answers "is there an adversarial
    example within eps" like the others. Cost per iteration: one forward and
    ``candidates - 1`` backward passes to the input.
    """

    name = "deepfool"
    supports_targeted = False

    def __init__(
        self,
        norm: "Norm | str",
        eps: float,
        *,
        steps: int = 50,
        overshoot: float = 0.02,
        candidates: int = 10,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        super().__init__(norm, eps, seed=seed, batch_size=batch_size)
        self.steps = check_int(steps, "steps", 1)
        self.candidates = check_int(candidates, "candidates", 2)
        self.overshoot = float(overshoot)
        if not self.overshoot >= 0:
            raise UsageError(f"overshoot must be >= 0, got {overshoot!r}")
        self.cost = float(self.steps * (self.candidates - 1) / 4)

    def _perturb(self, model, x, y, target, generator) -> AttackOutput:
        n = x.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)
        with torch.no_grad():
            logits0 = model(x)
        k = logits0.shape[1]
        nc = min(self.candidates, k)
        masked = logits0.clone()
        masked.scatter_(1, y.view(-1, 1), float("-inf"))
        cand = masked.topk(nc - 1, dim=1).indices  # (n, nc-1) other classes, highest logits first
        r_tot = torch.zeros_like(x)
        x_cur = x.clone()
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            xa = x_cur[idx].detach().requires_grad_(True)
            ya, ca = y[idx], cand[idx]
            with torch.enable_grad():
                logits = model(xa)
                done = predict(logits.detach()) != ya
                fy = logits.gather(1, ya.view(-1, 1)).squeeze(1)
                best_dist = torch.full((idx.numel(),), float("inf"), device=x.device, dtype=x.dtype)
                best_f = torch.zeros_like(best_dist)
                best_w = torch.zeros_like(xa)
                for j in range(nc - 1):
                    fk = logits.gather(1, ca[:, j : j + 1]).squeeze(1) - fy
                    (w,) = torch.autograd.grad(fk.sum(), xa, retain_graph=j < nc - 2)
                    w = torch.nan_to_num(w.detach(), nan=0.0, posinf=0.0, neginf=0.0)
                    wn = w.flatten(1).abs().sum(1) if self.norm is Norm.LINF else w.flatten(1).norm(dim=1)
                    dist = fk.detach().abs() / wn.clamp_min(1e-12)
                    better = dist < best_dist
                    best_dist = torch.where(better, dist, best_dist)
                    best_f = torch.where(better, fk.detach().abs(), best_f)
                    best_w[better] = w[better]
            if self.norm is Norm.LINF:
                scale = (best_f + 1e-4) / best_w.flatten(1).abs().sum(1).clamp_min(1e-12)
                r_i = scale.view(view) * best_w.sign()
            else:
                scale = (best_f + 1e-4) / best_w.flatten(1).pow(2).sum(1).clamp_min(1e-12)
                r_i = scale.view(view) * best_w
            upd = ~done
            r_tot[idx[upd]] = r_tot[idx[upd]] + r_i[upd]
            x_cur[idx[upd]] = (x[idx[upd]] + (1 + self.overshoot) * r_tot[idx[upd]]).clamp(0.0, 1.0)
            active[idx[done]] = False
        x_adv = project(x_cur, x, self.norm, per_sample(self.eps, x))
        with torch.no_grad():
            succ = is_success(model(x_adv), y, None)
        return AttackOutput(x_adv, succ)
