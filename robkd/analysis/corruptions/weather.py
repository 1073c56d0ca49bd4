"""Weather corruptions: snow, frost, fog (Hendrycks & Dietterich, 2019)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from robkd.analysis.corruptions._common import (
    Profile,
    clipped_zoom,
    grey,
    motion_blur_layer,
    need_grey_or_rgb,
    next_power_of_2,
    plasma_fractal,
)
from robkd.analysis.corruptions.textures import frost_textures

__all__ = ["snow", "frost", "fog"]

# (CIFAR-10-C, ImageNet-C) severity tables
SNOW = ([(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
         (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
        [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
         (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)])
# (flake mean, flake std, zoom, threshold, blur radius, blur sigma, image weight)
FROST = ([(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
         [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)])  # (image weight, frost weight)
FOG = ([(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
       [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)])  # (fog strength, fractal decay)
#: CIFAR-10-C shrinks the frost photographs by this factor before cropping 32x32
CIFAR_FROST_SCALE = 0.2


def snow(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """Gaussian flakes, zoomed, thresholded, motion-blurred along a random angle in [-135, -45] degrees and
    8-bit rounded, added twice (the layer and its 180-degree rotation) to the image brightened towards
    ``1.5 * grey + 0.5``. The flake layer is blurred before being cropped to the image (as in
    ``imagecorruptions``, whose numpy motion blur stands in for the reference's ImageMagick call)."""
    need_grey_or_rgb(x, "snow")
    mu, sd, zoom, thr, radius, sigma, keep = profile.pick(*SNOW, severity)
    radius = int(math.ceil(radius * profile.scale))
    sigma *= profile.scale
    n, _, h, w = x.shape
    layers = []
    for i in range(n):
        r = rngs[i]
        layer = torch.from_numpy(r.normal(size=(h, w), loc=mu, scale=sd)).to(x.dtype).view(1, 1, h, w)
        layer = clipped_zoom(layer, zoom)[0]
        layer = torch.where(layer < thr, torch.zeros_like(layer), layer).clamp(0, 1)
        layer = motion_blur_layer(layer, radius, sigma, float(r.uniform(-135, -45)))
        layer = torch.round(layer * 255.0) / 255.0
        layers.append(layer[:, :h, :w])
    flakes = torch.stack(layers).to(x.device)
    base = keep * x + (1 - keep) * torch.maximum(x, grey(x) * 1.5 + 0.5)
    return (base + flakes + torch.rot90(flakes, 2, dims=(-2, -1))).clamp(0, 1)


def _fit_texture(tex: torch.Tensor, h: int, w: int, factor: float) -> torch.Tensor:
    """Resize a (3, th, tw) texture by ``factor`` (bilinear, half-pixel centres, like OpenCV's INTER_LINEAR);
    if it is then smaller than the image, enlarge it to cover the image with a 10% margin."""
    th, tw = tex.shape[-2:]
    if factor != 1.0:
        size = (max(1, int(round(th * factor))), max(1, int(round(tw * factor))))
        tex = F.interpolate(tex[None], size=size, mode="bilinear", align_corners=False)[0]
        th, tw = size
    if th < h or tw < w:
        f = 1.1 * max(h / th, w / tw)
        size = (int(math.ceil(th * f)), int(math.ceil(tw * f)))
        tex = F.interpolate(tex[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return tex


def frost(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """``clip(a x + b F)`` with ``F`` a random crop of one of the first five frost textures (the reference
    never picks the sixth). CIFAR-10-C shrinks the textures by 0.2 (robkd: ``0.2 * min(H, W) / 32``),
    ImageNet-C crops them at full size. Grey images get the texture's luma (weights 0.2989, 0.587, 0.114).
    The textures are the reference photographs when the ``imagecorruptions`` package is installed, else
    deterministic synthetic ones (see :mod:`robkd.analysis.corruptions.textures`)."""
    need_grey_or_rgb(x, "frost")
    a, b = profile.pick(*FROST, severity)
    n, c, h, w = x.shape
    factor = CIFAR_FROST_SCALE * profile.scale if profile.name == "cifar" else 1.0
    textures = [_fit_texture(t, h, w, factor) for t in frost_textures()[:5]]
    crops = []
    for i in range(n):
        r = rngs[i]
        tex = textures[int(r.randint(5))]
        th, tw = tex.shape[-2:]
        top = int(r.randint(0, th - h)) if th > h else 0
        left = int(r.randint(0, tw - w)) if tw > w else 0
        crop = tex[:, top : top + h, left : left + w]
        if c == 1:
            wts = torch.tensor([0.2989, 0.5870, 0.1140], dtype=crop.dtype).view(3, 1, 1)
            crop = (crop * wts).sum(0, keepdim=True)
        crops.append(crop)
    layer = torch.stack(crops).to(dtype=x.dtype, device=x.device)
    return (a * x + b * layer).clamp(0, 1)


def fog(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """Add ``c`` times a diamond-square plasma fractal (side: the next power of two of the image side) and
    rescale by ``max / (max + c)`` (``max``: the image's largest value)."""
    strength, decay = profile.pick(*FOG, severity)
    n, _, h, w = x.shape
    size = next_power_of_2(max(h, w))
    maps = np.stack([plasma_fractal(size, decay, rngs[i])[:h, :w] for i in range(n)])
    layer = torch.from_numpy(maps).to(dtype=x.dtype, device=x.device).unsqueeze(1)
    peak = x.flatten(1).amax(dim=1).view(n, 1, 1, 1)
    return ((x + strength * layer) * peak / (peak + strength)).clamp(0, 1)
