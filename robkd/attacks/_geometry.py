"""Norm-ball geometry in [0,1] pixel space: norms, projections, steps, random starts.

All helpers act per sample on batched tensors ``(B, ...)``. A radius may be a
Python float or a per-sample tensor ``(B,)``.
"""

from __future__ import annotations

import math

import torch

from robkd.attacks.noise import SampleNoise
from robkd.errors import UsageError
from robkd.types import Norm

_TINY = 1e-12


def _bshape(x: torch.Tensor) -> tuple[int, ...]:
    """``(B, 1, ..., 1)`` for broadcasting a per-sample value over ``x``."""
    return (x.shape[0],) + (1,) * (x.dim() - 1)


def per_sample(value: "float | torch.Tensor", x: torch.Tensor, name: str = "eps") -> torch.Tensor:
    """Broadcastable ``(B, 1, ..., 1)`` tensor from a float or a ``(B,)`` tensor; validated >= 0."""
    b = x.shape[0]
    if isinstance(value, torch.Tensor):
        t = value.detach().to(device=x.device, dtype=x.dtype)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise UsageError(f"{name} must be a float or a tensor of shape ({b},), got shape {tuple(t.shape)}")
    else:
        try:
            v = float(value)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{name} must be a number, got {value!r}") from exc
        t = torch.full((b,), v, device=x.device, dtype=x.dtype)
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise UsageError(f"{name} must be finite and >= 0")
    return t.view(_bshape(x))


def lp_norm(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-sample norm ``(B,)`` of a batched perturbation."""
    flat = delta.flatten(1)
    if flat.shape[1] == 0:
        return flat.new_zeros(flat.shape[0])
    if norm is Norm.LINF:
        return flat.abs().amax(dim=1)
    return flat.norm(p=2, dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: Norm, eps: torch.Tensor) -> torch.Tensor:
    """Project ``x_adv`` onto the ``norm``-ball of radius ``eps`` (broadcastable) around ``x``, then into [0,1].

    Clamping to [0,1] after the ball projection keeps the point inside the ball
    (every coordinate moves towards ``x``, which lies in [0,1]), so the result is
    in the intersection. For Linf this is the exact Euclidean projection onto the
    intersection; for L2 it is the standard (slightly conservative) approximation.
    """
    delta = x_adv - x
    if norm is Norm.LINF:
        delta = torch.maximum(torch.minimum(delta, eps), -eps)
    else:
        n = lp_norm(delta, Norm.L2).view(_bshape(delta))
        factor = torch.where(n > eps, eps / n.clamp_min(_TINY), torch.ones_like(n))
        delta = delta * factor
    return (x + delta).clamp(0.0, 1.0)


def ascent_direction(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Steepest-ascent unit direction: ``sign(g)`` for Linf, ``g/||g||_2`` for L2 (0 where g = 0)."""
    if norm is Norm.LINF:
        return grad.sign()
    n = lp_norm(grad, Norm.L2).view(_bshape(grad))
    return grad / n.clamp_min(_TINY)


class BatchSlice:
    """Rows ``start:stop`` of the noise one generator draws for a whole batch of ``total`` rows.

    Under DistributedDataParallel each rank attacks its own part of a global batch; drawing the global
    batch's noise on every rank (the generators stay in lockstep) and keeping its own rows gives every
    sample the random start it gets in one process, and different starts on different ranks."""

    def __init__(self, generator: torch.Generator, start: int, stop: int, total: int) -> None:
        if not 0 <= start < stop <= total:
            raise UsageError(f"bad batch slice {start}:{stop} of {total}")
        self.generator, self.start, self.stop, self.total = generator, start, stop, total

    def __len__(self) -> int:
        return self.stop - self.start


def random_start_point(
    x: torch.Tensor,
    norm: Norm,
    eps: torch.Tensor,
    random_start: "str | None",
    generator: "torch.Generator | SampleNoise | BatchSlice | None",
) -> torch.Tensor:
    """A random starting point in the ball ∩ [0,1] (see :func:`projected_gradient_ascent`).

    ``generator`` may be a :class:`~robkd.attacks.noise.SampleNoise` with one row per
    sample: each sample's start then depends on its own id only, not on the batch; or a
    :class:`BatchSlice`: the rows of a larger batch's noise.
    """
    if random_start is None or random_start == "none":
        return x.clone()
    if isinstance(generator, SampleNoise):
        if len(generator) != x.shape[0]:
            raise UsageError(f"the SampleNoise has {len(generator)} rows for a batch of {x.shape[0]}")
        noise = generator

        def _draw(fn, shape):
            draw = noise.rand if fn is torch.rand else noise.randn
            return draw(shape, dtype=x.dtype, device=noise.device).to(x.device)
    elif isinstance(generator, BatchSlice):
        if len(generator) != x.shape[0]:
            raise UsageError(f"the batch slice has {len(generator)} rows for a batch of {x.shape[0]}")
        part = generator

        def _draw(fn, shape):
            full = fn((part.total,) + tuple(shape[1:]), generator=part.generator, device=part.generator.device,
                      dtype=x.dtype)
            return full[part.start : part.stop].to(x.device)
    else:
        gen_device = generator.device if generator is not None else x.device

        def _draw(fn, shape):
            return fn(shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)

    def _rand(fn):
        return _draw(fn, x.shape)

    if random_start == "uniform":
        if norm is Norm.LINF:
            delta = (_rand(torch.rand) * 2.0 - 1.0) * eps
        else:
            # uniform in the L2 ball: Gaussian direction, radius eps * U^(1/d)
            d = x[0].numel()
            direction = _rand(torch.randn)
            direction = direction / lp_norm(direction, Norm.L2).clamp_min(_TINY).view(_bshape(x))
            u = _draw(torch.rand, (x.shape[0],))
            r = u.pow(1.0 / max(d, 1)).view(_bshape(x))
            delta = direction * r * eps
        return project(x + delta, x, norm, eps)
    if isinstance(random_start, str) and random_start.startswith("normal:"):
        try:
            std = float(random_start.split(":", 1)[1])
        except ValueError as exc:
            raise UsageError(f"bad random_start {random_start!r}: use 'normal:<std>', e.g. 'normal:0.001'") from exc
        if not math.isfinite(std) or std < 0:
            raise UsageError(f"bad random_start {random_start!r}: std must be finite and >= 0")
        return project(x + std * _rand(torch.randn), x, norm, eps)
    raise UsageError(f"unknown random_start {random_start!r}: use 'uniform', 'normal:<std>' or None")
