"""Deterministic sharding and object collectives (gather to rank 0, broadcast from rank 0).

Sharding is a pure function of ``(n, rank, world_size)``, so every rank agrees on it
without communication and a resumed run finds the same shard again.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence, TypeVar

import torch

from robkd.distributed.context import DistContext, cpu_group, current
from robkd.errors import RobkdError, UsageError

log = logging.getLogger(__name__)
T = TypeVar("T")


def _check_rank(rank: int, world_size: int) -> None:
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise UsageError(f"{name} must be an integer, got {v!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s contiguous block of ``n`` items (sizes differ by at most one).

    The first ``n % world_size`` ranks get one extra item; a rank may get none when
    ``n < world_size``.
    """
    _check_rank(rank, world_size)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UsageError(f"n must be an integer >= 0, got {n!r}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_positions(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Positions ``(n_rank,)`` int64 of ``rank``'s block (see :func:`shard_bounds`)."""
    start, stop = shard_bounds(n, rank, world_size)
    return torch.arange(start, stop, dtype=torch.int64)


def strided_positions(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Positions ``rank, rank + W, rank + 2W, ...`` below ``n`` (DistributedSampler's assignment, no padding)."""
    _check_rank(rank, world_size)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UsageError(f"n must be an integer >= 0, got {n!r}")
    return torch.arange(rank, max(n, rank), world_size, dtype=torch.int64)


def gather_to_main(obj: T, ctx: DistContext | None = None) -> list[T] | None:
    """Every rank's ``obj`` (picklable; tensors are moved to the CPU) as a list on rank 0, None elsewhere.

    In a single process this is ``[obj]``.
    """
    import torch.distributed as dist

    ctx = ctx or current()
    if not ctx.distributed:
        return [obj]
    obj = _to_cpu(obj)
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0, group=cpu_group())
    return out


def broadcast_from_main(obj: T | None, ctx: DistContext | None = None) -> T:
    """Rank 0's ``obj`` on every rank (the argument is ignored elsewhere)."""
    import torch.distributed as dist

    ctx = ctx or current()
    if not ctx.distributed:
        return obj  # type: ignore[return-value]
    box = [_to_cpu(obj) if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, group=cpu_group())
    return box[0]  # type: ignore[return-value]


def all_gather(obj: T, ctx: DistContext | None = None) -> list[T]:
    """Every rank's ``obj`` on every rank, in rank order."""
    import torch.distributed as dist

    ctx = ctx or current()
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, _to_cpu(obj), group=cpu_group())
    return out


def on_main(fn: Callable[[], T], ctx: DistContext | None = None) -> T:
    """Run ``fn`` on rank 0 only and give its result to every rank.

    A :class:`~robkd.errors.RobkdError` raised on rank 0 is raised again, with the
    same class and message, on every rank (so no rank waits forever for one that
    failed on bad input); other exceptions become a :class:`RobkdError` elsewhere.
    """
    ctx = ctx or current()
    if not ctx.distributed:
        return fn()
    payload: tuple[str, Any] | None = None
    error: BaseException | None = None
    if ctx.is_main:
        try:
            payload = ("ok", fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = exc
            payload = ("err", (type(exc), str(exc)))
    payload = broadcast_from_main(payload, ctx)
    if error is not None:
        raise error
    kind, value = payload  # type: ignore[misc]
    if kind == "ok":
        return value
    cls, message = value
    if isinstance(cls, type) and issubclass(cls, RobkdError):
        try:
            raise cls(message)
        except TypeError:  # a subclass with another constructor
            pass
    raise RobkdError(f"rank 0 failed: {cls.__name__ if isinstance(cls, type) else cls}: {message}")


def all_ranks(fn: Callable[[], T], ctx: DistContext | None = None) -> T:
    """Run ``fn`` on every rank; if it raised a :class:`RobkdError` on any rank, raise it on every rank.

    Keeps the ranks in step when a check may fail on some ranks only (e.g. per-rank
    resume state). Other exceptions propagate on the failing rank (torchrun then stops
    the others).
    """
    ctx = ctx or current()
    if not ctx.distributed:
        return fn()
    value: Any = None
    failure: tuple[Any, str] | None = None
    try:
        value = fn()
    except RobkdError as exc:
        failure = (type(exc), f"rank {ctx.rank}: {exc}")
    failures = [f for f in all_gather(failure, ctx) if f is not None]
    if failures:
        cls, message = failures[0]
        try:
            err = cls(message)
        except TypeError:
            err = RobkdError(message)
        raise err
    return value


def check_same(value: Any, what: str, ctx: DistContext | None = None) -> None:
    """Raise a :class:`UsageError` on every rank when ranks disagree on ``value`` (e.g. a data hash)."""
    values = all_gather(value, ctx)
    if any(v != values[0] for v in values[1:]):
        raise UsageError(f"the ranks disagree on {what}: {values!r} (every rank must see the same files and settings)")


def concat_by_position(parts: Sequence[torch.Tensor], positions: Sequence[torch.Tensor], n: int, dim: int = 0) -> torch.Tensor:
    """Place per-shard tensors back at their sample ``positions`` along ``dim`` (inverse of sharding)."""
    if len(parts) != len(positions) or not parts:
        raise UsageError("need one positions tensor per part")
    first = parts[0]
    shape = list(first.shape)
    shape[dim] = n
    out = torch.empty(shape, dtype=first.dtype)
    filled = torch.zeros(n, dtype=torch.bool)
    for p, pos in zip(parts, positions):
        pos = pos.to(torch.int64).cpu()
        if p.shape[dim] != pos.numel():
            raise UsageError(f"a part has {p.shape[dim]} rows for {pos.numel()} positions")
        out.index_copy_(dim, pos, p.detach().cpu().to(first.dtype))
        filled[pos] = True
    if not bool(filled.all()):
        raise UsageError(f"{int((~filled).sum())} position(s) were covered by no rank")
    return out


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_to_cpu(v) for v in obj)
    return obj
