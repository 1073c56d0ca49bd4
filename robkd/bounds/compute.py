"""``compute_bounds``: bounds of ``C @ model(x')`` over a ball, and the margin specification ``C``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from robkd.bounds.checks import batch_input_shape, check_batch_size, in_eval_mode
from robkd.bounds.graph import BoundedModel
from robkd.bounds.inputset import eps_tensor
from robkd.types import Norm


@in_eval_mode
def compute_bounds(
    model: nn.Module,
    x: torch.Tensor,
    eps: "float | torch.Tensor",
    *,
    norm: "Norm | str" = Norm.LINF,
    method: str = "crown",
    C: torch.Tensor | None = None,
    intermediate: str = "crown",
    alpha_steps: int = 20,
    batch_size: int = 128,
    on_batch: "Callable[[int], None] | None" = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sound lower/upper bounds of ``C @ model(x')`` for every ``x'`` in the ball around ``x``.

    The ball is ``{x' : ||x' - x|| <= eps} & [0,1]^n`` (``eps`` a float or a
    per-sample tensor). ``C`` is ``(S, K)`` or ``(B, S, K)``; identity (plain
    logit bounds) when None. Returns ``(lb, ub)`` of shape ``(B, S)``. The model runs in eval mode
    (restored afterwards). ``on_batch(n)`` is called after each batch of ``n`` samples (progress).
    """
    norm = Norm.parse(norm)
    check_batch_size(batch_size)
    bm = BoundedModel(model, batch_input_shape(x))
    bm.check(method)
    eps_all = eps_tensor(eps, x)
    lbs, ubs = [], []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            Cb = C if C is None or C.dim() == 2 else C[s : s + batch_size]
            lb, ub, _ = bm.bounds(
                x[s : s + batch_size], eps_all[s : s + batch_size], norm=norm, method=method, C=Cb,
                intermediate=intermediate, alpha_steps=alpha_steps,
            )
            lbs.append(lb)
            ubs.append(ub)
            if on_batch is not None:
                on_batch(int(lb.shape[0]))
    return torch.cat(lbs), torch.cat(ubs)


def margin_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Specification ``(B, K-1, K)``: row j is ``e_y - e_j`` for every ``j != y`` (increasing j)."""
    B = y.shape[0]
    others = torch.arange(num_classes, device=y.device).expand(B, num_classes)
    others = others[others != y.view(B, 1)].view(B, num_classes - 1)
    C = torch.zeros(B, num_classes - 1, num_classes, device=y.device)
    C.scatter_(2, y.view(B, 1, 1).expand(B, num_classes - 1, 1), 1.0)
    C.scatter_(2, others.unsqueeze(-1), -1.0)
    return C
