"""Merging per-shard results back into the single-process form."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from robkd.distributed.collect import concat_by_position
from robkd.errors import UsageError


def merge_suite_results(parts: Sequence[Any], positions: Sequence[torch.Tensor], n: int) -> Any:
    """One :class:`~robkd.attacks.SuiteResult` over all ``n`` samples from per-shard results.

    ``parts[k]`` covers the samples at ``positions[k]``. Per-sample tensors are put back
    in place; ``done`` is what every shard finished; ``rejected`` counts are summed;
    ``seconds`` is the slowest shard's time per attack (wall clock). The merged result's
    data fingerprint is left empty (resume state is kept per shard, not merged).
    """
    from robkd.attacks import SuiteResult

    parts = [p if isinstance(p, SuiteResult) else SuiteResult.from_tensors(p) for p in parts]
    if not parts:
        raise UsageError("nothing to merge")
    head = parts[0]
    for p in parts[1:]:
        if p.attacks != head.attacks or p.radii != head.radii or p.norm is not head.norm:
            raise UsageError("the shards were attacked with different suites or radii")
    done = set(head.done)
    rejected: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for p in parts:
        done &= set(p.done)
        for k, v in p.rejected.items():
            rejected[k] = rejected.get(k, 0) + int(v)
        for k, v in p.seconds.items():
            seconds[k] = max(seconds.get(k, 0.0), float(v))
    return SuiteResult(
        attacks=list(head.attacks),
        order=list(head.order),
        radii=list(head.radii),
        norm=head.norm,
        clean_correct=concat_by_position([p.clean_correct for p in parts], positions, n),
        broken_by=concat_by_position([p.broken_by for p in parts], positions, n, dim=1),
        x_adv=concat_by_position([p.x_adv for p in parts], positions, n),
        adv_radius=concat_by_position([p.adv_radius for p in parts], positions, n),
        done=done,
        rejected=rejected,
        seconds=seconds,
        fingerprint=[],
    )
