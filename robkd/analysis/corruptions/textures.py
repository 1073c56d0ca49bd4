"""Frost textures: the reference photographs when available, else deterministic synthetic ones.

Hendrycks & Dietterich's frost corruption blends the image with crops of six frost
photographs that ship with their code and with the ``imagecorruptions`` package.
robkd does not bundle those photographs (their licence as images is not stated
apart from the code's). :func:`frost_textures` therefore

* loads them from an installed ``imagecorruptions`` package (found without importing
  it), which gives the published corruption exactly (``frost_source() ==
  "imagecorruptions"``); or
* synthesises five textures deterministically (``"synthetic"``): a plasma-fractal haze
  plus a few thousand thin, lightly blurred ice streaks, each texture standardised to
  the per-channel mean and standard deviation of the corresponding photograph (measured
  once from the reference files and written below). This is a documented departure:
  accuracies under ``frost`` computed with the synthetic textures are comparable in
  brightness and contrast statistics, not pixel for pixel, to the published ones.

Set ``ROBKD_FROST=synthetic`` to force the synthetic textures (e.g. for figures that
must not depend on an optional package). Every result should record :func:`frost_source`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import torch

from robkd.analysis.corruptions._common import gaussian, plasma_fractal

log = logging.getLogger(__name__)

__all__ = ["frost_source", "frost_textures"]

_FILES = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg"]
#: per-channel RGB (mean, std) of the reference photographs frost1..frost5, and their sizes (H, W)
_STATS = [
    ((0.305, 0.585, 0.650), (0.106, 0.065, 0.060), (600, 900)),
    ((0.787, 0.805, 0.841), (0.084, 0.087, 0.089), (315, 560)),
    ((0.787, 0.805, 0.841), (0.084, 0.087, 0.089), (315, 560)),
    ((0.540, 0.599, 0.648), (0.112, 0.112, 0.117), (350, 527)),
    ((0.441, 0.484, 0.528), (0.174, 0.170, 0.163), (495, 660)),
]


def _reference_dir() -> "Path | None":
    if os.environ.get("ROBKD_FROST", "").lower() == "synthetic":
        return None
    try:
        spec = importlib.util.find_spec("imagecorruptions")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    d = Path(spec.origin).parent / "frost"
    return d if all((d / f).is_file() for f in _FILES[:5]) else None


def frost_source() -> str:
    """``"imagecorruptions"`` (the reference photographs) or ``"synthetic"``."""
    return "imagecorruptions" if _reference_dir() is not None else "synthetic"


def _synthetic(index: int) -> torch.Tensor:
    mean, std, (h, w) = _STATS[index]
    rng = np.random.RandomState(20190401 + index)
    side = 1 << (max(h, w) - 1).bit_length()
    haze = plasma_fractal(side, 2.0, rng)[:h, :w]
    streaks = np.zeros((h, w))
    n_streaks = h * w // 60
    starts = rng.uniform(0, 1, size=(n_streaks, 2)) * (h, w)
    angles = rng.uniform(0, np.pi, size=n_streaks)
    lengths = rng.uniform(4, 40, size=n_streaks)
    weights = rng.uniform(0.2, 1.0, size=n_streaks)
    t = np.linspace(0, 1, 48)
    rows = (starts[:, :1] + np.sin(angles)[:, None] * lengths[:, None] * t).round().astype(int) % h
    cols = (starts[:, 1:] + np.cos(angles)[:, None] * lengths[:, None] * t).round().astype(int) % w
    np.add.at(streaks, (rows.ravel(), cols.ravel()), np.repeat(weights, t.size) / 8.0)
    base = torch.from_numpy(0.5 * haze + np.minimum(streaks, 1.0)).view(1, 1, h, w)
    base = gaussian(base, 0.7)[0, 0]
    base = (base - base.mean()) / base.std().clamp_min(1e-12)
    m = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    return (m + s * base).clamp(0, 1)


@functools.lru_cache(maxsize=2)
def _load(source_dir: "str | None") -> tuple[torch.Tensor, ...]:
    if source_dir is None:
        return tuple(_synthetic(i) for i in range(5))
    from PIL import Image

    out = []
    for f in _FILES[:5]:
        with Image.open(Path(source_dir) / f) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
        out.append(torch.from_numpy(a).permute(2, 0, 1).contiguous())
    return tuple(out)


def frost_textures() -> tuple[torch.Tensor, ...]:
    """Five RGB float64 textures (3, H, W) in [0,1] (see the module docstring for their source)."""
    d = _reference_dir()
    return _load(None if d is None else str(d))
