"""Device names: the one parser and availability check (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""

from __future__ import annotations

import torch

from robkd.errors import UsageError


def parse_device(name: "str | torch.device | None") -> torch.device:
    """``name`` as a ``torch.device`` that exists on this machine (None: the CPU); an unknown or unavailable
    device is a one-line :class:`UsageError` before any data is loaded."""
    if name is None:
        return torch.device("cpu")
    try:
        dev = torch.device(name.strip().lower() if isinstance(name, str) else name)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise UsageError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"device {name!r} requested but MPS is not available (use --device cpu)")
    elif dev.type != "cpu":
        raise UsageError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or mps")
    return dev
