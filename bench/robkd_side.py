"""Thin adapters to robkd's public API, so every benchmark family calls robkd the same way.

Each adapter returns plain tensors; the harness re-checks results itself
(forward passes, radius checks) rather than trusting robkd's own claims.
"""

from __future__ import annotations

import importlib

import torch


def available(module: str, attr: str) -> bool:
    """True when ``module.attr`` exists (robkd parts land while the benchmarks are being written)."""
    try:
        return hasattr(importlib.import_module(module), attr)
    except Exception:
        return False


def pgd_attack(model, x, y, *, eps: float, alpha: float, steps: int, random_start: bool, seed: int = 0) -> torch.Tensor:
    """robkd's evaluation attack ``make_attack("pgd-<steps>")`` (early exit, frozen parameters)."""
    try:
        from robkd.attacks import make_attack
    except ImportError:  # before the package exports it
        from robkd.attacks.registry import make_attack

    atk = make_attack(f"pgd-{steps}", "Linf", eps, step_size=alpha, random_start="uniform" if random_start else None,
                      seed=seed, batch_size=max(1, int(x.shape[0])))
    return atk(model, x, y)


def pgd_primitive(model, x, y, *, eps: float, alpha: float, steps: int, random_start: bool, seed: int = 0) -> torch.Tensor:
    """robkd's inner maximiser ``projected_gradient_ascent`` on the per-sample CE (no early exit)."""
    import torch.nn.functional as F

    from robkd.attacks.pgd import projected_gradient_ascent

    g = torch.Generator().manual_seed(seed)
    return projected_gradient_ascent(lambda z: F.cross_entropy(model(z), y, reduction="none"), x, norm="Linf", eps=eps,
                                     steps=steps, step_size=alpha, random_start="uniform" if random_start else None,
                                     generator=g)


def suite_curve(model, x, y, radii, attacks: list[str], *, seed: int = 0, batch_size: int = 256,
                options: dict | None = None):
    """``Suite(attacks).run(model, x, y, radii)`` without progress bars; returns the SuiteResult."""
    from robkd.attacks import Suite

    suite = Suite(attacks, "Linf", seed=seed, batch_size=batch_size, attack_options=options or {}, progress=False)
    return suite.run(model, x, y, list(radii))
