"""The device a training process computes on."""

from __future__ import annotations

import torch

from robkd.errors import UsageError


def resolve_device(device: "str | torch.device | None") -> torch.device:
    """The device this process trains on; a device that is unknown or not available is a :class:`UsageError`.

    Uses :func:`robkd.distributed.context._resolve_device` (under ``torchrun`` a CUDA
    device becomes ``cuda:LOCAL_RANK``) and also checks that a ``cuda:N`` index and
    MPS exist, so that the error is one line before any data is loaded.
    """
    from robkd.distributed.context import _env_int, _resolve_device, env_world_size

    world = env_world_size()
    dev = _resolve_device(device, _env_int("LOCAL_RANK", 0) if world > 1 else 0, world)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"device {device!r} requested but MPS is not available (use --device cpu)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported training device {device!r}: use cpu, cuda, cuda:N or mps")
    return dev
