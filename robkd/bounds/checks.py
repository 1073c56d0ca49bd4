"""Argument checks and eval mode shared by the bound entry points (compute, certify, regions, MILP)."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from robkd.errors import UsageError
from robkd.utils.modules import eval_mode

_F = TypeVar("_F", bound=Callable[..., Any])


def in_eval_mode(fn: _F) -> _F:
    """Decorator: run ``fn(model, ...)`` with ``model`` in eval mode; every module's previous mode is
    restored afterwards (BatchNorm uses, and never updates, its running statistics)."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        with eval_mode(model):
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def batch_input_shape(x: torch.Tensor) -> tuple[int, ...]:
    """The per-sample shape of ``x``, a non-empty float batch in [0,1] (raises UsageError otherwise)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
        raise UsageError(f"x must be a non-empty batch tensor (B, ...), got {getattr(x, 'shape', type(x))}")
    if not torch.is_floating_point(x):
        raise UsageError(f"x must be a float tensor in [0,1], got {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    if not (0.0 <= lo and hi <= 1.0):
        raise UsageError(f"inputs must lie in [0,1] pixel space, got values in [{lo:.3g}, {hi:.3g}]")
    return tuple(int(s) for s in x.shape[1:])


def check_batch_size(batch_size: int) -> None:
    """Raise UsageError unless ``batch_size`` is a positive integer."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
