"""DistributedDataParallel helpers for the trainer: global batches split across ranks.

Design (see docs/distributed.md): every rank draws the same global data order and
augmentation from the same seeded generators; global batch ``b`` (``batch_size``
samples) is cut into contiguous per-rank parts; each rank computes the objective on
its part, its loss scaled by ``W * b_k / b`` so that DDP's gradient *average* equals
the gradient of the global batch mean (exactly, also for an uneven last batch).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from robkd.distributed.collect import shard_bounds
from robkd.distributed.context import DistContext, current

log = logging.getLogger(__name__)


def local_part(global_idx: torch.Tensor, ctx: DistContext | None = None) -> tuple[int, int]:
    """``[start, stop)`` of this rank's rows of a global batch (contiguous, sizes differ by at most one)."""
    ctx = ctx or current()
    return shard_bounds(int(global_idx.shape[0]), ctx.rank, ctx.world_size)


def loss_scale(local_n: int, global_n: int, ctx: DistContext | None = None) -> float:
    """Factor for a rank's batch-mean loss so that DDP's averaged gradient is the global batch mean's."""
    ctx = ctx or current()
    if not ctx.distributed:
        return 1.0
    return ctx.world_size * local_n / max(global_n, 1)


def wrap(model: torch.nn.Module, ctx: DistContext | None = None, *, sync_batchnorm: bool = False) -> torch.nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` (unchanged in a single process).

    Buffers are not broadcast on every forward (the trainer calls the raw module for
    attacks and validation, so ranks may run different numbers of forward passes).
    With ``sync_batchnorm`` (CUDA only) BatchNorm layers become SyncBatchNorm, so
    batch statistics are those of the global batch; otherwise each rank normalises
    with its own part's statistics. On CUDA the module is moved to the rank's GPU
    (``ctx.device``) and DDP gets ``device_ids=[index]``.
    """
    ctx = ctx or current()
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif has_bn:
        log.warning("the student has BatchNorm layers: each rank normalises with the statistics of its own part of the "
                    "batch (SyncBatchNorm needs CUDA), so training differs slightly from one process with the same global batch")
    import inspect

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    # no buffer broadcast before every forward (newer torch: forward_sync_buffers; the replicas start identical)
    kw: dict[str, Any] = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    if ctx.device.type == "cuda":  # one GPU per process: cuda:LOCAL_RANK (set by init_from_env)
        index = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
        model.to(torch.device("cuda", index))  # DDP with device_ids needs the module on that GPU
        kw["device_ids"] = [index]
        kw["output_device"] = index
    return DistributedDataParallel(model, **kw)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (the model itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def sum_across_ranks(values: dict[str, float], ctx: DistContext | None = None) -> dict[str, float]:
    """Element-wise sum of a ``name -> float`` dict over the ranks (same keys on every rank), in float64."""
    ctx = ctx or current()
    if not ctx.distributed or not values:
        return dict(values)
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device(ctx))
    dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.cpu().tolist())}


def average_buffers(model: torch.nn.Module, ctx: DistContext | None = None) -> None:
    """Make every rank's buffers equal: floating ones (BatchNorm running mean/var) become their mean over
    the ranks, the others (``num_batches_tracked``) rank 0's. Called at the end of every training pass,
    before validation and the checkpoint, so that all ranks validate, select and save the same model
    (each rank's running statistics saw only its own part of every batch)."""
    ctx = ctx or current()
    if not ctx.distributed:
        return
    import torch.distributed as dist

    dev = _collective_device(ctx)
    for buf in unwrap(model).buffers():
        t = buf.detach().to(dev)
        if torch.is_floating_point(t):
            dist.all_reduce(t)
            t /= ctx.world_size
        else:
            dist.broadcast(t, src=0)
        buf.data.copy_(t.to(buf.device))


def _collective_device(ctx: DistContext) -> Any:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")
