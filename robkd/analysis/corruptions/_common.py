"""Shared pieces of the common corruptions: parameter profiles, per-sample random streams, filters.

Every corruption takes ``(x, severity, rngs, profile)``: ``x`` a float ``(N, C, H, W)``
batch in [0,1], ``severity`` in 1..5, ``rngs`` one :class:`numpy.random.RandomState`
per sample and ``profile`` the parameter set (:func:`resolve_profile`). Random
fields are drawn per sample, in the reference code's order and shapes (H, W, C
layout), from that sample's own stream, so a sample's corruption depends on
(seed, sample id, corruption, severity) only, never on the batch it is in.

The filters below reproduce the reference code's numerical primitives in torch:
``gaussian`` is :func:`scipy.ndimage.gaussian_filter` (``truncate`` x sigma
radius) with scipy's boundary modes ``nearest`` and ``reflect`` (half-sample
symmetric); ``bilinear_zoom`` is :func:`scipy.ndimage.zoom` with ``order=1``;
``sample_reflect`` is :func:`scipy.ndimage.map_coordinates` with ``order=1,
mode='reflect'``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from robkd.errors import UsageError

#: image side from which the ImageNet-C parameters apply (``params="auto"``)
IMAGENET_MIN_SIDE = 224
#: the side the CIFAR-10-C parameters were written for
CIFAR_SIDE = 32


@dataclasses.dataclass(frozen=True)
class Profile:
    """Which published parameter table applies, and how spatial parameters are scaled.

    ``name`` is ``"cifar"`` (CIFAR-10-C, Hendrycks & Dietterich's ``make_cifar_c.py``)
    or ``"imagenet"`` (ImageNet-C, ``make_imagenet_c.py``). ``scale`` multiplies the
    *spatial* parameters (blur radii and sigmas, glass-blur displacement, motion-blur
    length, the frost texture's scale): ``min(H, W) / 32`` for the CIFAR table (1 at
    32x32, 0.875 for 28x28 Fashion-MNIST), 1 for the ImageNet table (applied unscaled
    at any size >= 224, as the ``imagecorruptions`` package does). ``imsize`` is the
    ``IMSIZE`` of the elastic transform (``min(H, W)``).
    """

    name: str
    scale: float
    imsize: int

    def pick(self, cifar: Sequence, imagenet: Sequence, severity: int):
        """The severity's entry of the table that applies."""
        return (cifar if self.name == "cifar" else imagenet)[severity - 1]


def resolve_profile(h: int, w: int, params: str = "auto") -> Profile:
    """``params``: ``"auto"`` (ImageNet-C from a 224 side up, else CIFAR-10-C scaled), ``"cifar"``, ``"imagenet"``."""
    side = min(h, w)
    if params == "auto":
        params = "imagenet" if side >= IMAGENET_MIN_SIDE else "cifar"
    if params == "cifar":
        return Profile("cifar", side / CIFAR_SIDE, side)
    if params == "imagenet":
        return Profile("imagenet", 1.0, side)
    raise UsageError(f"params must be 'auto', 'cifar' or 'imagenet', got {params!r}")


def hwc(x: torch.Tensor, i: int) -> np.ndarray:
    """Sample ``i`` as a float64 (H, W, C) numpy array (the reference code's layout)."""
    return x[i].detach().permute(1, 2, 0).double().cpu().numpy()


def from_hwc(arrays: Sequence[np.ndarray], like: torch.Tensor) -> torch.Tensor:
    """Stack (H, W, C) arrays back into an (N, C, H, W) tensor of ``like``'s dtype and device."""
    t = torch.from_numpy(np.stack([np.asarray(a, dtype=np.float64) for a in arrays])).permute(0, 3, 1, 2)
    return t.to(dtype=like.dtype, device=like.device).contiguous()


def grey(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma: ITU-R 601 weights (0.299, 0.587, 0.114) for RGB, the image itself for one channel."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise UsageError(f"this corruption needs 1 (grey) or 3 (RGB) channels, got {x.shape[1]}")
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def need_grey_or_rgb(x: torch.Tensor, name: str) -> None:
    if x.shape[1] not in (1, 3):
        raise UsageError(f"{name} needs 1 (grey) or 3 (RGB) channels, got {x.shape[1]}")


# ---------------------------------------------------------------------------
# padding and separable filters (scipy.ndimage semantics)


def _pad_index(n: int, pad: int, mode: str, device: torch.device) -> torch.Tensor:
    """Source indices of a 1-D signal of length ``n`` padded by ``pad`` on both sides."""
    idx = torch.arange(-pad, n + pad, device=device)
    if mode == "nearest":
        return idx.clamp(0, n - 1)
    if mode == "reflect":  # scipy 'reflect': d c b a | a b c d | d c b a (half-sample symmetric)
        period = 2 * n
        m = torch.remainder(idx, period)
        return torch.where(m >= n, period - 1 - m, m)
    if mode == "mirror":  # scipy 'mirror' / OpenCV BORDER_REFLECT_101: d c b | a b c d | c b a
        if n == 1:
            return torch.zeros_like(idx)
        period = 2 * n - 2
        m = torch.remainder(idx, period)
        return torch.where(m >= n, period - m, m)
    raise ValueError(mode)


def pad2d(x: torch.Tensor, ph: int, pw: int, mode: str) -> torch.Tensor:
    """Pad the last two dims of ``x`` by ``ph``/``pw`` with a scipy boundary mode (any pad size)."""
    if ph:
        x = x.index_select(-2, _pad_index(x.shape[-2], ph, mode, x.device))
    if pw:
        x = x.index_select(-1, _pad_index(x.shape[-1], pw, mode, x.device))
    return x


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy's 1-D Gaussian weights: radius ``int(truncate * sigma + 0.5)``, normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    if sigma <= 0 or radius == 0:
        return np.ones(1)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 / (sigma * sigma) * t * t)
    return k / k.sum()


def filter2d(x: torch.Tensor, kernel: np.ndarray, mode: str) -> torch.Tensor:
    """Correlate every channel of ``x`` (N, C, H, W) with a centred 2-D ``kernel`` (odd sides), boundary ``mode``."""
    kh, kw = kernel.shape
    n, c, h, w = x.shape
    k = torch.as_tensor(np.ascontiguousarray(kernel), dtype=x.dtype, device=x.device).view(1, 1, kh, kw)
    xp = pad2d(x.reshape(n * c, 1, h, w), kh // 2, kw // 2, mode)
    return F.conv2d(xp, k).view(n, c, h, w)


def gaussian(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """:func:`scipy.ndimage.gaussian_filter` over the two spatial dims of (N, C, H, W) (channels apart)."""
    k = gaussian_kernel1d(sigma, truncate)
    if k.size == 1:
        return x.clone()
    x = filter2d(x, k[None, :], mode)
    return filter2d(x, k[:, None], mode)


def bilinear_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """:func:`scipy.ndimage.zoom` with ``order=1`` on the spatial dims: output side ``round(n * zoom)``,
    output pixel ``o`` sampled at input ``o * (n - 1) / (out - 1)`` (corners aligned)."""
    h, w = x.shape[-2:]
    oh, ow = int(round(h * zoom)), int(round(w * zoom))
    return F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=True)


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Zoom into the centre: crop ``ceil(n / zoom)`` around the centre, zoom by ``zoom`` (the result may be
    a pixel or two larger than the input; callers crop ``[:H, :W]`` as the reference code does)."""
    h, w = x.shape[-2:]
    ch, cw = int(math.ceil(h / float(zoom))), int(math.ceil(w / float(zoom)))
    top, left = (h - ch) // 2, (w - cw) // 2
    return bilinear_zoom(x[..., top : top + ch, left : left + cw], zoom)


def _reflect_coord(c: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    if mode == "reflect":  # about the outer pixel edges (-0.5 and n - 0.5)
        m = torch.remainder(c + 0.5, 2 * n)
        return torch.where(m >= n, 2 * n - m, m) - 0.5
    if n == 1:  # "mirror": about the edge pixel centres (0 and n - 1), OpenCV's reflect-101
        return torch.zeros_like(c)
    m = torch.remainder(c, 2 * n - 2)
    return torch.where(m > n - 1, 2 * n - 2 - m, m)


def sample_reflect(img: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
    """Bilinear samples of ``img`` (C, H, W) at float coordinates ``rows``/``cols`` (H', W'). ``mode="reflect"``
    is :func:`scipy.ndimage.map_coordinates` ``order=1, mode='reflect'``; ``"mirror"`` reflects about the edge
    pixels' centres (OpenCV's ``BORDER_REFLECT_101``)."""
    _, h, w = img.shape
    r, q = _reflect_coord(rows, h, mode), _reflect_coord(cols, w, mode)
    r0, q0 = torch.floor(r), torch.floor(q)
    fr, fq = (r - r0).to(img.dtype), (q - q0).to(img.dtype)
    r0, q0 = r0.long(), q0.long()
    r1, q1 = (r0 + 1).clamp(0, h - 1), (q0 + 1).clamp(0, w - 1)
    r0, q0 = r0.clamp(0, h - 1), q0.clamp(0, w - 1)

    def at(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return img[:, a, b]

    top = at(r0, q0) * (1 - fq) + at(r0, q1) * fq
    bottom = at(r1, q0) * (1 - fq) + at(r1, q1) * fq
    return top * (1 - fr) + bottom * fr


def shift_replicate(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Translate the last two dims by ``dx`` columns / ``dy`` rows, repeating the edge pixels."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h, device=x.device) - dy).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device) - dx).clamp(0, w - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


def motion_blur_layer(x: torch.Tensor, radius: int, sigma: float, angle: float) -> torch.Tensor:
    """ImageMagick's MotionBlurImage as ported by ``imagecorruptions``: a one-sided Gaussian-weighted sum of
    ``2 * radius + 1`` copies of ``x`` (C, H, W) shifted along ``angle`` (degrees), edges repeated."""
    width = 2 * int(radius) + 1
    k = np.exp(-(np.arange(width, dtype=np.float64) ** 2) / (2.0 * sigma * sigma))
    k = k / k.sum()
    py, px = width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle))
    hyp = math.hypot(py, px)
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for i in range(width):
        dy = -math.ceil((i * py) / hyp - 0.5)
        dx = -math.ceil((i * px) / hyp - 0.5)
        if abs(dy) >= h or abs(dx) >= w:
            break  # the motion left the image
        out = out + float(k[i]) * shift_replicate(x, dx, dy)
    return out


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.RandomState) -> np.ndarray:
    """Diamond-square height map in [0,1] (``mapsize`` a power of two), the reference's draw order."""
    a = np.empty((mapsize, mapsize), dtype=np.float64)
    a[0, 0] = 0
    step, wibble = mapsize, 100.0

    def wibbled(arr: np.ndarray) -> np.ndarray:
        return arr / 4 + wibble * rng.uniform(-wibble, wibble, arr.shape)

    while step >= 2:
        corner = a[0:mapsize:step, 0:mapsize:step]
        sq = corner + np.roll(corner, shift=-1, axis=0)
        sq += np.roll(sq, shift=-1, axis=1)
        a[step // 2 : mapsize : step, step // 2 : mapsize : step] = wibbled(sq)
        dr = a[step // 2 : mapsize : step, step // 2 : mapsize : step]
        ul = a[0:mapsize:step, 0:mapsize:step]
        lt = (dr + np.roll(dr, 1, axis=0)) + (ul + np.roll(ul, -1, axis=1))
        a[0:mapsize:step, step // 2 : mapsize : step] = wibbled(lt)
        tt = (dr + np.roll(dr, 1, axis=1)) + (ul + np.roll(ul, -1, axis=0))
        a[step // 2 : mapsize : step, 0:mapsize:step] = wibbled(tt)
        step //= 2
        wibble /= wibbledecay
    a -= a.min()
    return a / a.max()


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 2 ** (int(n) - 1).bit_length()
