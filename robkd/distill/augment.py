"""Training-set augmentation drawn from a seeded generator (reproducible and resumable)."""

from __future__ import annotations

import torch


def resolve_augment(augment: str, dataset: str | None) -> str:
    """``auto`` -> ``crop-flip`` for CIFAR (pad 4 + horizontal flip), ``none`` otherwise (Fashion-MNIST, MNIST)."""
    if augment != "auto":
        return augment
    return "crop-flip" if dataset and dataset.lower().startswith("cifar") else "none"


def augment_batch(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (4 px for inputs >= 32 px, else 2 px) and/or horizontal flip (p = 0.5).

    Draws from ``gen`` only, so the augmentation is reproducible and resumable.
    """
    if kind == "none":
        return x
    b, _, h, w = x.shape
    if "crop" in kind:
        p = 4 if min(h, w) >= 32 else 2
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        rows = (oy[:, None] + torch.arange(h)[None, :])  # (B,H)
        cols = (ox[:, None] + torch.arange(w)[None, :])  # (B,W)
        bi = torch.arange(b)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    if "flip" in kind:
        flip = torch.rand((b,), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x
