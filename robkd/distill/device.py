"""The device a training process computes on."""

from __future__ import annotations

import torch


def resolve_device(device: "str | torch.device | None") -> torch.device:
    """The device this process trains on (:func:`robkd.distributed.context.rank_device`: under ``torchrun`` a
    CUDA device becomes ``cuda:LOCAL_RANK``); an unknown or unavailable device is a one-line
    :class:`~robkd.errors.UsageError` before any data is loaded."""
    from robkd.distributed.context import env_local_rank, env_world_size, rank_device

    world = env_world_size()
    return rank_device(device, env_local_rank() if world > 1 else 0, world)
