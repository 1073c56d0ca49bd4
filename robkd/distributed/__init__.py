"""Scale-out with ``torch.distributed`` under ``torchrun``: process groups, sharding, gathering.

- :func:`init_from_env` / :func:`current`: the :class:`DistContext` of this process
  (rank, world size, backend, device); a single process when not started by torchrun.
- :func:`shard_positions` / :func:`shard_bounds`: deterministic contiguous shards;
  :func:`strided_positions`: DistributedSampler-style assignment.
- :func:`gather_to_main`, :func:`broadcast_from_main`, :func:`all_gather`,
  :func:`on_main` (rank-0-only work whose errors reach every rank), :func:`barrier`.
- :func:`merge_suite_results`: per-shard attack results back into one.
- :mod:`robkd.distributed.ddp`: DistributedDataParallel helpers of the trainer (per-rank parts of
  global batches, loss scaling, sums over ranks).
- :mod:`robkd.distributed.launch`: ``--launcher torchrun`` re-execution.

See docs/distributed.md.
"""

from robkd.distributed.collect import (
    all_gather,
    all_ranks,
    broadcast_from_main,
    check_same,
    concat_by_position,
    gather_to_main,
    on_main,
    shard_bounds,
    shard_positions,
    strided_positions,
)
from robkd.distributed.context import DistContext, barrier, current, env_world_size, init_from_env, shutdown
from robkd.distributed.results import merge_suite_results

__all__ = [
    "DistContext",
    "all_gather",
    "all_ranks",
    "barrier",
    "broadcast_from_main",
    "check_same",
    "concat_by_position",
    "current",
    "env_world_size",
    "gather_to_main",
    "init_from_env",
    "merge_suite_results",
    "on_main",
    "shard_bounds",
    "shard_positions",
    "shutdown",
    "strided_positions",
]
