"""Blur corruptions: defocus_blur, glass_blur, motion_blur, zoom_blur (Hendrycks & Dietterich, 2019)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from robkd.analysis.corruptions._common import (
    Profile,
    clipped_zoom,
    filter2d,
    gaussian,
    motion_blur_layer,
)

__all__ = ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur"]

# (CIFAR-10-C, ImageNet-C) severity tables
DEFOCUS = ([(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
           [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)])  # (disk radius, anti-alias sigma)
GLASS = ([(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
         [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)])  # (sigma, max displacement, iterations)
MOTION = ([(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
          [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)])  # (radius, sigma)
ZOOM = ([np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
         np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)],
        [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
         np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)])  # zoom factors averaged


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's anti-aliased disk: the indicator of ``X^2 + Y^2 <= r^2`` on a grid of half-side
    ``max(8, ceil(r))``, normalised, then Gaussian-blurred (3x3 kernel, 5x5 beyond radius 8; OpenCV's
    reflect-101 border), with its all-zero border trimmed (which does not change the filtered image)."""
    half = 8 if radius <= 8 else int(math.ceil(radius))
    grid = np.arange(-half, half + 1, dtype=np.float64)
    xx, yy = np.meshgrid(grid, grid)
    k = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    k /= k.sum()
    size = 3 if radius <= 8 else 5
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(t**2) / (2.0 * alias_blur**2))
    g /= g.sum()
    kt = torch.from_numpy(k).view(1, 1, *k.shape)
    kt = filter2d(filter2d(kt, g[None, :], "mirror"), g[:, None], "mirror")[0, 0].numpy()
    rows, cols = np.nonzero(np.abs(kt) > 0)
    r = max(half - rows.min(), rows.max() - half)
    c = max(half - cols.min(), cols.max() - half)
    return kt[half - r : half + r + 1, half - c : half + c + 1]


def defocus_blur(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """Correlation with an anti-aliased disk (OpenCV ``filter2D``, reflect-101 border)."""
    radius, alias = profile.pick(*DEFOCUS, severity)
    kernel = disk_kernel(radius * profile.scale, alias * profile.scale)
    return filter2d(x, kernel, "mirror").clamp(0, 1)


def glass_blur(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """Gaussian blur, quantise to 8 bits, locally scramble pixels, Gaussian blur again.

    The scramble visits rows ``H - d .. d + 1`` and, in each, columns ``W - d .. d + 1`` (descending),
    drawing ``(dx, dy)`` uniformly in ``[-d, d)`` and replacing the pixel by the one at ``(h + dy, w + dx)``.
    The reference code writes this as a swap of two numpy views of an RGB array, which copies the pixel one
    way only; robkd reproduces that effective operation for every channel count.
    """
    sigma, delta, iters = profile.pick(*GLASS, severity)
    sigma *= profile.scale
    delta = max(1, int(round(delta * profile.scale)))
    n, _, h, w = x.shape
    y = torch.floor(gaussian(x, sigma, "nearest") * 255.0) / 255.0
    hs = list(range(h - delta, delta, -1))
    ws = list(range(w - delta, delta, -1))
    npos = len(hs) * len(ws)
    if npos:
        draws = torch.from_numpy(np.stack([r.randint(-delta, delta, size=(iters * npos, 2)) for r in rngs]))
        draws = draws.to(x.device)
        rows = torch.arange(n, device=x.device)
        p = 0
        for _ in range(iters):
            for hh in hs:
                for ww in ws:
                    dx, dy = draws[:, p, 0], draws[:, p, 1]
                    y[:, :, hh, ww] = y[rows, :, hh + dy, ww + dx]
                    p += 1
    return gaussian(y, sigma, "nearest").clamp(0, 1)


def motion_blur(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """Motion blur along a random angle in [-45, 45] degrees (ImageMagick's kernel as ported by
    ``imagecorruptions``: ``2 ceil(radius) + 1`` Gaussian-weighted shifted copies, edges repeated)."""
    radius, sigma = profile.pick(*MOTION, severity)
    radius = int(math.ceil(radius * profile.scale))
    sigma *= profile.scale
    out = [motion_blur_layer(x[i], radius, sigma, float(rngs[i].uniform(-45, 45))) for i in range(x.shape[0])]
    return torch.stack(out).clamp(0, 1)


def zoom_blur(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """Mean of the image and its centre zooms by each factor of the severity's list."""
    factors = profile.pick(*ZOOM, severity)
    h, w = x.shape[-2:]
    out = x.clone()
    for z in factors:
        out = out + clipped_zoom(x, float(z))[..., :h, :w]
    return (out / (len(factors) + 1)).clamp(0, 1)
