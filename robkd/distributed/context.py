"""Process-group setup for runs started by ``torchrun`` (PyTorch's own launcher and engine).

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in every worker; :func:`init_from_env` turns them into an
initialised ``torch.distributed`` process group (``nccl`` when the run uses CUDA,
``gloo`` otherwise) and a :class:`DistContext`. Without those variables (or with
``WORLD_SIZE=1``) nothing is initialised and the context is the single process.

Object collectives (gathering per-shard results) always go through a ``gloo``
group on the CPU, so they work whatever the main backend is.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from typing import Any

import torch

from robkd.errors import UsageError

log = logging.getLogger(__name__)

#: seconds a collective may wait for the other ranks (rank 0 alone writes results and reports)
DEFAULT_TIMEOUT_S = 3 * 3600

_STATE: dict[str, Any] = {"ctx": None, "cpu_group": None, "owned": False}


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run.

    ``device`` is the device this rank computes on (``cuda:LOCAL_RANK`` for CUDA runs).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes results, checkpoints and reports)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (recorded in results and training logs)."""
        return {"world_size": self.world_size, "backend": self.backend}


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset); a malformed value is a :class:`UsageError`."""
    raw = os.environ.get("WORLD_SIZE")
    if raw is None or raw == "":
        return 1
    try:
        value = int(raw)
    except ValueError as exc:
        raise UsageError(f"WORLD_SIZE={raw!r} is not an integer") from exc
    if value < 1:
        raise UsageError(f"WORLD_SIZE must be >= 1, got {value}")
    return value


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise UsageError(f"{name}={raw!r} is not an integer") from exc


def rank_device(device: "str | torch.device | None", local_rank: int = 0, world: int = 1) -> torch.device:
    """The device of a rank (:func:`robkd.utils.device.parse_device`); under torchrun (``world`` > 1) ``cuda``
    or any ``cuda:N`` becomes ``cuda:LOCAL_RANK`` (one GPU per process), and mps is refused."""
    from robkd.utils.device import parse_device

    dev = parse_device(device)
    if world > 1 and dev.type == "cuda":
        if dev.index is not None and dev.index != local_rank:
            log.info("rank with LOCAL_RANK=%d uses cuda:%d (not %s): one GPU per process", local_rank, local_rank, dev)
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
                             "use --nproc-per-node <= the number of GPUs")
        return torch.device("cuda", local_rank)
    if world > 1 and dev.type == "mps":
        raise UsageError("multi-process runs support cpu (gloo) and cuda (nccl), not mps")
    return dev


def env_local_rank() -> int:
    """``LOCAL_RANK`` from the environment (0 when unset)."""
    return _env_int("LOCAL_RANK", 0)


def init_from_env(device: "str | torch.device | None" = None, *, backend: str | None = None,
                  timeout_s: float | None = None) -> DistContext:
    """Initialise the process group from torchrun's environment (idempotent) and return the context.

    ``device`` is the requested device (``cpu``/``cuda``...); under torchrun a CUDA
    device becomes ``cuda:LOCAL_RANK``. ``backend`` defaults to ``nccl`` for CUDA and
    ``gloo`` otherwise. ``timeout_s`` (default: ``ROBKD_DIST_TIMEOUT_S`` or 3 h) bounds
    how long a rank waits for the others in a collective.
    """
    import torch.distributed as dist

    world = env_world_size()
    if world == 1:
        ctx = DistContext(device=rank_device(device, 0, 1))
        return ctx
    rank = _env_int("RANK", -1)
    local_rank = env_local_rank()
    if not 0 <= rank < world:
        raise UsageError(f"RANK={os.environ.get('RANK')!r} is not in [0, {world}): start multi-process runs with torchrun")
    dev = rank_device(device, local_rank, world)
    be = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if be not in ("gloo", "nccl"):
        raise UsageError(f"unknown backend {be!r}: use gloo (CPU) or nccl (CUDA)")
    if be == "nccl" and dev.type != "cuda":
        raise UsageError("the nccl backend needs --device cuda")
    prev: DistContext | None = _STATE["ctx"]
    if dist.is_initialized():
        if prev is not None and (prev.backend != be or prev.device != dev):
            raise UsageError(f"the process group is already initialised with {prev.backend} on {prev.device}; "
                             f"cannot switch to {be} on {dev} in the same process")
        current = dist.get_backend()
        ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                          backend=str(current), device=dev)
    else:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if timeout_s is None:
            timeout_s = float(os.environ.get("ROBKD_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise UsageError(f"{var} is not set: start multi-process runs with torchrun")
        dist.init_process_group(backend=be, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        _STATE["owned"] = True
        ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=be, device=dev)
        log.debug("rank %d/%d initialised (%s on %s)", rank, world, be, dev)
        if rank != 0:  # rank 0 speaks for the job; the others report warnings and errors only
            robkd_log = logging.getLogger("robkd")
            robkd_log.setLevel(max(robkd_log.getEffectiveLevel(), logging.WARNING))
    _STATE["ctx"] = ctx
    return ctx


def current() -> DistContext:
    """The context set up by :func:`init_from_env` (the single process when none is active)."""
    import torch.distributed as dist

    ctx = _STATE["ctx"]
    if ctx is not None and dist.is_available() and dist.is_initialized():
        return ctx
    if dist.is_available() and dist.is_initialized():  # initialised by the caller's own code
        ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), backend=str(dist.get_backend()))
        return ctx
    return DistContext()


def cpu_group() -> Any:
    """A gloo group for object collectives (the default group when it already is gloo)."""
    import torch.distributed as dist

    if str(dist.get_backend()) == "gloo":
        return None
    if _STATE["cpu_group"] is None:
        _STATE["cpu_group"] = dist.new_group(backend="gloo")
    return _STATE["cpu_group"]


def barrier(ctx: DistContext | None = None) -> None:
    """Wait for every rank (no-op in a single process)."""
    import torch.distributed as dist

    ctx = ctx or current()
    if ctx.distributed:
        dist.barrier(group=cpu_group())


def shutdown(*, wait: bool = False) -> None:
    """Destroy the process group if :func:`init_from_env` created it (safe to call twice).

    ``wait=True`` (a command that finished normally) first waits for the other ranks: rank 0
    alone still writes results and reports when the others are done, and a gloo group torn down
    while a peer still uses it can abort a process at exit ("terminate called without an active
    exception"). After an error nobody waits: the failing rank exits and torchrun stops the rest.
    Objects still holding the group (a DDP wrapper in a reference cycle) are collected while the
    interpreter is alive."""
    import gc

    import torch.distributed as dist

    if _STATE["owned"] and dist.is_available() and dist.is_initialized():
        if wait:
            try:
                barrier()
            except Exception as exc:  # a peer died: torchrun ends the job; tearing down is all that is left
                log.debug("barrier before destroying the process group failed: %s", exc)
        dist.destroy_process_group()
        gc.collect()
    _STATE.update(ctx=None, cpu_group=None, owned=False)
