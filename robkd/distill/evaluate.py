"""Validation during training: clean and PGD robust accuracy of a model on a dataset."""

from __future__ import annotations

import torch

from robkd.data.core import ImageData
from robkd.utils.logits import correct
from robkd.utils.modules import eval_mode, model_device


def evaluate_robust(model: torch.nn.Module, data: ImageData, *, norm: str, eps: float, steps: int, step_size: float,
                    seed: int = 0, batch_size: int = 256) -> tuple[float, float]:
    """(clean accuracy, PGD-``steps`` robust accuracy) of ``model`` on ``data`` (eval mode, fixed seed).

    Runs on the model's device; the attack's random starts are drawn on the CPU. An output row with
    NaN/inf is never counted correct (:func:`robkd.utils.logits.correct`).
    """
    from robkd.attacks.pgd import projected_gradient_ascent

    dev = model_device(model)
    gen = torch.Generator().manual_seed(int(seed))
    clean = robust = 0
    with eval_mode(model):
        for x, y in data.batches(batch_size):
            x, y = x.to(dev), y.to(dev)
            with torch.no_grad():
                ok = correct(model(x), y)
            clean += int(ok.sum())
            if steps > 0 and eps > 0:
                x_adv = projected_gradient_ascent(
                    lambda z: torch.nn.functional.cross_entropy(model(z), y, reduction="none"),
                    x, norm=norm, eps=eps, steps=steps, step_size=step_size, random_start="uniform", generator=gen,
                )
                with torch.no_grad():
                    ok = ok & correct(model(x_adv), y)
            robust += int(ok.sum())
    n = max(1, len(data))
    return clean / n, robust / n
