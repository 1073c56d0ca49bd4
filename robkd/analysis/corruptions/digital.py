"""Digital corruptions: brightness, contrast, elastic_transform, pixelate, jpeg_compression
(Hendrycks & Dietterich, 2019)."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch

from robkd.analysis.corruptions._common import Profile, gaussian, need_grey_or_rgb, sample_reflect

__all__ = ["brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"]

# (CIFAR-10-C, ImageNet-C) severity tables
BRIGHTNESS = ([0.05, 0.1, 0.15, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5])
CONTRAST = ([0.75, 0.5, 0.4, 0.3, 0.15], [0.4, 0.3, 0.2, 0.1, 0.05])
PIXELATE = ([0.95, 0.9, 0.85, 0.75, 0.65], [0.6, 0.5, 0.4, 0.3, 0.25])
JPEG = ([80, 65, 58, 50, 40], [25, 18, 15, 10, 7])
#: elastic (alpha, sigma, affine range) as multiples of IMSIZE (CIFAR-10-C) / of 244 (ImageNet-C, as printed)
ELASTIC_CIFAR = [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)]
ELASTIC_IMAGENET = [(244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),
                    (244 * 0.05, 244 * 0.01, 244 * 0.02), (244 * 0.07, 244 * 0.01, 244 * 0.02),
                    (244 * 0.12, 244 * 0.01, 244 * 0.02)]


def brightness(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """Add ``c`` to the HSV value channel (clipped to 1). Hue and saturation are kept, so an RGB pixel is
    scaled by ``V' / V`` (``V = max`` over channels; a black pixel becomes grey ``V'``); grey: ``x + c``."""
    need_grey_or_rgb(x, "brightness")
    c = profile.pick(*BRIGHTNESS, severity)
    v = x.amax(dim=1, keepdim=True)
    v2 = (v + c).clamp(0, 1)
    scaled = x * (v2 / v.clamp_min(1e-30))
    return torch.where(v > 0, scaled, v2.expand_as(x)).clamp(0, 1)


def contrast(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """Shrink every channel towards its spatial mean: ``(x - mean) * c + mean``."""
    c = profile.pick(*CONTRAST, severity)
    means = x.mean(dim=(-2, -1), keepdim=True)
    return ((x - means) * c + means).clamp(0, 1)


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 affine map taking the three ``src`` points to ``dst`` (OpenCV's getAffineTransform)."""
    a = np.concatenate([src.astype(np.float64), np.ones((3, 1))], axis=1)
    return np.linalg.solve(a, dst.astype(np.float64)).T


def elastic_transform(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """The published elastic transform: a random affine warp (three control points moved uniformly by up
    to ``c2``; bilinear, reflect-101 border) followed by a smooth displacement field (uniform noise in
    [-1, 1] Gaussian-filtered with sigma ``c1``, ``mode='reflect'``, truncate 3, times ``c0``) sampled
    bilinearly with scipy's ``reflect`` border. (``imagecorruptions`` replaced this by a different, affine-free
    definition; robkd follows the CIFAR-10-C / ImageNet-C one.)"""
    n, c, h, w = x.shape
    if profile.name == "cifar":
        alpha, sigma, span = (v * profile.imsize for v in ELASTIC_CIFAR[severity - 1])
    else:
        alpha, sigma, span = ELASTIC_IMAGENET[severity - 1]
    centre = np.float32([h, w]) // 2
    size = min(h, w) // 3
    src = np.float32([centre + size, [centre[0] + size, centre[1] - size], centre - size])
    rows0 = torch.arange(h, dtype=torch.float64).view(h, 1).expand(h, w)
    cols0 = torch.arange(w, dtype=torch.float64).view(1, w).expand(h, w)
    out = []
    for i in range(n):
        r = rngs[i]
        dst = src + r.uniform(-span, span, size=src.shape).astype(np.float32)
        img = x[i].detach().double().cpu()
        if size > 0:  # images under 3 pixels a side have no control triangle: no affine part
            m = np.concatenate([_affine_from_points(src, dst), [[0.0, 0.0, 1.0]]])
            inv = np.linalg.inv(m)  # dst(x, y) = src(inv @ (x, y, 1)), with x the column and y the row
            src_cols = inv[0, 0] * cols0 + inv[0, 1] * rows0 + inv[0, 2]
            src_rows = inv[1, 0] * cols0 + inv[1, 1] * rows0 + inv[1, 2]
            img = sample_reflect(img, src_rows, src_cols, mode="mirror")
        fields = []
        for _ in range(2):
            noise = torch.from_numpy(r.uniform(-1, 1, size=(h, w))).view(1, 1, h, w)
            fields.append((gaussian(noise, sigma, "reflect", truncate=3.0)[0, 0] * alpha).float().double())
        dx, dy = fields
        out.append(sample_reflect(img, rows0 + dy, cols0 + dx, mode="reflect"))
    return torch.stack(out).to(dtype=x.dtype, device=x.device).clamp(0, 1)


def pixelate(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """Box-filter down to ``int(c * side)`` and box-filter back up (PIL ``BOX`` both ways, on float images;
    ``imagecorruptions`` uses ``NEAREST`` for the way up)."""
    from PIL import Image

    c = profile.pick(*PIXELATE, severity)
    n, ch, h, w = x.shape
    small = (max(1, int(w * c)), max(1, int(h * c)))
    arr = x.detach().cpu().float().numpy()
    out = np.empty_like(arr)
    for i in range(n):
        for k in range(ch):
            im = Image.fromarray(arr[i, k], mode="F").resize(small, Image.BOX).resize((w, h), Image.BOX)
            out[i, k] = np.asarray(im)
    return torch.from_numpy(out).to(dtype=x.dtype, device=x.device).clamp(0, 1)


def jpeg_compression(x: torch.Tensor, severity: int, rngs: Sequence[np.random.RandomState], profile: Profile) -> torch.Tensor:
    """Round to 8 bits, JPEG-encode at quality ``q`` with Pillow (RGB: Pillow's default 4:2:0 chroma
    subsampling; grey: a one-channel JPEG) and decode."""
    from PIL import Image

    need_grey_or_rgb(x, "jpeg_compression")
    q = profile.pick(*JPEG, severity)
    n, ch = x.shape[:2]
    arr = (x.detach().cpu().double() * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for i in range(n):
        im = Image.fromarray(arr[i, :, :, 0] if ch == 1 else arr[i], mode="L" if ch == 1 else "RGB")
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(q))
        buf.seek(0)
        with Image.open(buf) as dec:
            a = np.asarray(dec.convert("L" if ch == 1 else "RGB"), dtype=np.float64) / 255.0
        out.append(a[None] if ch == 1 else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)).to(dtype=x.dtype, device=x.device)
