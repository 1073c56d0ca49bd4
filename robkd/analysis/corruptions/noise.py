"""Noise corruptions: gaussian_noise, shot_noise, impulse_noise (Hendrycks & Dietterich, 2019)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from robkd.analysis.corruptions._common import Profile, from_hwc, hwc

__all__ = ["gaussian_noise", "shot_noise", "impulse_noise"]

# (CIFAR-10-C, ImageNet-C) severity tables
GAUSSIAN = ([0.04, 0.06, 0.08, 0.09, 0.10], [0.08, 0.12, 0.18, 0.26, 0.38])
SHOT = ([500, 250, 100, 75, 50], [60, 25, 12, 5, 3])
IMPULSE = ([0.01, 0.02, 0.03, 0.05, 0.07], [0.03, 0.06, 0.09, 0.17, 0.27])


def gaussian_noise(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """``clip(x + N(0, c^2))`` per pixel and channel."""
    c = profile.pick(*GAUSSIAN, severity)
    out = [np.clip(a + r.normal(size=a.shape, scale=c), 0, 1) for a, r in ((hwc(x, i), rngs[i]) for i in range(x.shape[0]))]
    return from_hwc(out, x)


def shot_noise(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """Poisson (photon) noise: ``clip(Poisson(c x) / c)`` with ``c`` photons at full intensity."""
    c = profile.pick(*SHOT, severity)
    out = [np.clip(r.poisson(a * c) / float(c), 0, 1) for a, r in ((hwc(x, i), rngs[i]) for i in range(x.shape[0]))]
    return from_hwc(out, x)


def impulse_noise(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """Salt-and-pepper noise (scikit-image ``random_noise(mode='s&p', amount=c)``): each value independently
    replaced with probability ``c``, by 1 or 0 with equal odds. (The reference draws from scikit-image's own
    generator, which cannot be seeded to match: compared in distribution.)"""
    c = profile.pick(*IMPULSE, severity)
    out = []
    for i in range(x.shape[0]):
        a, r = hwc(x, i), rngs[i]
        flip = r.random_sample(a.shape) < c
        salt = r.random_sample(a.shape) < 0.5
        a = a.copy()
        a[flip & salt] = 1.0
        a[flip & ~salt] = 0.0
        out.append(a)
    return from_hwc(out, x)
