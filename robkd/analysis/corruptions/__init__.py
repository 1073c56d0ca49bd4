"""The 15 common corruptions of Hendrycks & Dietterich (ICLR 2019), generated on the fly.

``corrupt(x, "fog", 3, seed=0)`` corrupts a float batch ``(N, C, H, W)`` in [0,1]
with the CIFAR-10-C parameters (images under 224 pixels a side, spatial parameters
scaled by ``min(H, W) / 32``: 0.875 for 28x28 Fashion-MNIST) or the ImageNet-C
parameters (224 and up); ``params="cifar"``/``"imagenet"`` forces a table. Each
sample's randomness comes from its own stream, seeded by ``(seed, sample id,
corruption, severity)`` (:func:`sample_seed`; ids default to the positions in
``x``, pass ``ids`` for a subset), so results are the same across runs, batch
sizes and batch orders.

The definitions follow the published generation code (``make_cifar_c.py``,
``make_imagenet_c.py``); where that code called ImageMagick (motion blur, snow)
robkd uses the numpy port of the ``imagecorruptions`` package, and frost uses the
reference photographs only where that package is installed (see
:mod:`robkd.analysis.corruptions.textures`). Departures are listed in each function's
docstring. :func:`corruption_accuracy` (:mod:`.accuracy`) evaluates a model on all
corruptions and severities.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from robkd.analysis.corruptions._common import Profile, resolve_profile
from robkd.analysis.corruptions.blur import defocus_blur, glass_blur, motion_blur, zoom_blur
from robkd.analysis.corruptions.digital import brightness, contrast, elastic_transform, jpeg_compression, pixelate
from robkd.analysis.corruptions.textures import frost_source
from robkd.analysis.corruptions.noise import gaussian_noise, impulse_noise, shot_noise
from robkd.analysis.corruptions.weather import fog, frost, snow
from robkd.attacks.noise import stream_seed
from robkd.errors import UsageError

__all__ = [
    "CORRUPTIONS",
    "FAMILIES",
    "SEVERITIES",
    "corrupt",
    "corruption_accuracy",
    "corruption_names",
    "frost_source",
    "resolve_profile",
    "sample_seed",
]

Corruption = Callable[[torch.Tensor, int, Sequence[np.random.RandomState], Profile], torch.Tensor]

#: name -> function, in the benchmark's order (noise, blur, weather, digital)
CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog"),
    "digital": ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
SEVERITIES = (1, 2, 3, 4, 5)
_INDEX = {name: i for i, name in enumerate(CORRUPTIONS)}


def corruption_names(family: "str | None" = None) -> list[str]:
    """All 15 names, or those of one family (``noise``, ``blur``, ``weather``, ``digital``)."""
    if family is None:
        return list(CORRUPTIONS)
    if family not in FAMILIES:
        raise UsageError(f"unknown corruption family {family!r}: use one of {', '.join(FAMILIES)}")
    return list(FAMILIES[family])


def check_name(name: object) -> str:
    if not isinstance(name, str) or name not in CORRUPTIONS:
        raise UsageError(f"unknown corruption {name!r}: use one of {', '.join(CORRUPTIONS)}")
    return name


def check_severity(severity: object) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise UsageError(f"severity must be an integer from 1 to 5, got {severity!r}")
    return severity


def sample_seed(seed: int, sample_id: int, name: str, severity: int) -> int:
    """The 32-bit seed of one sample's :class:`numpy.random.RandomState` for one corruption and severity."""
    return stream_seed(int(seed), int(sample_id), _INDEX[check_name(name)], int(severity)) & 0xFFFFFFFF


def _check_batch(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.dim() != 4 or x.shape[0] == 0:
        raise UsageError("x must be a non-empty floating-point tensor (N, C, H, W) in [0,1]")
    if x.shape[-1] < 2 or x.shape[-2] < 2:
        raise UsageError(f"images must be at least 2x2 pixels, got {tuple(x.shape[-2:])}")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise UsageError("x must lie in [0,1] pixel space (normalisation belongs inside the model)")
    return x.detach()


def corrupt(
    x: torch.Tensor,
    name: str,
    severity: int,
    *,
    seed: int = 0,
    ids: "torch.Tensor | Sequence[int] | None" = None,
    params: str = "auto",
) -> torch.Tensor:
    """``x`` (N, C, H, W) in [0,1] corrupted by ``name`` at ``severity`` (1..5); same shape, dtype, device.

    ``ids`` (default ``0..N-1``) name the samples for seeding; ``params``: ``"auto"``, ``"cifar"`` or
    ``"imagenet"`` (see the module docstring)."""
    name = check_name(name)
    severity = check_severity(severity)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, got {seed!r}")
    x = _check_batch(x)
    n = x.shape[0]
    id_list = list(range(n)) if ids is None else [int(v) for v in torch.as_tensor(ids).flatten().tolist()]
    if len(id_list) != n:
        raise UsageError(f"ids must give one id per sample ({n}), got {len(id_list)}")
    profile = resolve_profile(x.shape[-2], x.shape[-1], params)
    rngs = [np.random.RandomState(sample_seed(seed, i, name, severity)) for i in id_list]
    return CORRUPTIONS[name](x, severity, rngs, profile)


def __getattr__(attr: str):
    if attr == "corruption_accuracy":
        from robkd.analysis.corruptions.accuracy import corruption_accuracy

        return corruption_accuracy
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
