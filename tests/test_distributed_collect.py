"""Process-group helpers with 2 real gloo processes (torch.multiprocessing spawn, 127.0.0.1)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from robkd.distributed import DistContext, current, init_from_env
from robkd.distributed.launch import free_port
from robkd.errors import UsageError


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import json

    from robkd.distributed import (all_gather, all_ranks, barrier, broadcast_from_main, gather_to_main, on_main,
                                   shard_positions, shutdown)
    from robkd.errors import DataError, RobkdError

    ctx = init_from_env("cpu")
    res: dict = {"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend, "same": init_from_env("cpu") == ctx}
    pos = shard_positions(7, ctx.rank, ctx.world_size)
    got = gather_to_main({"pos": pos, "sq": pos.float() ** 2}, ctx)
    res["gathered"] = None if got is None else [g["sq"].tolist() for g in got]
    res["bcast"] = broadcast_from_main({"v": torch.arange(3) * 10} if ctx.is_main else "ignored", ctx)["v"].tolist()
    res["all"] = all_gather(ctx.rank * 2, ctx)
    res["on_main"] = on_main(lambda: f"computed by {current().rank}", ctx)
    try:  # an input error on rank 0 reaches every rank, with its class and message
        on_main(lambda: (_ for _ in ()).throw(DataError("bad data on rank 0")), ctx)
    except DataError as exc:
        res["on_main_error"] = ["DataError", str(exc)]
    try:  # a failure on rank 1 only stops both ranks
        all_ranks(lambda: (_ for _ in ()).throw(DataError("rank-1 state")) if ctx.rank == 1 else 5, ctx)
    except RobkdError as exc:
        res["all_ranks_error"] = [type(exc).__name__, str(exc)]
    # BatchNorm running statistics that drifted apart per rank: averaged (floats), rank 0's (counters)
    from robkd.distributed.ddp import average_buffers

    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(ctx.rank + 1))
    bn.running_var.fill_(float(2 * ctx.rank + 1))
    bn.num_batches_tracked.fill_(7 + ctx.rank)
    average_buffers(bn, ctx)
    res["bn"] = [bn.running_mean.tolist(), bn.running_var.tolist(), int(bn.num_batches_tracked)]
    barrier(ctx)
    shutdown()
    with open(os.path.join(out_dir, f"r{rank}.json"), "w") as f:
        json.dump(res, f)


def test_collectives_with_two_gloo_processes(tmp_path):
    import json

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "r0.json").read_text())
    r1 = json.loads((tmp_path / "r1.json").read_text())
    assert (r0["rank"], r1["rank"], r0["world"], r0["backend"]) == (0, 1, 2, "gloo")
    assert r0["same"] and r1["same"]  # init_from_env is idempotent
    assert r0["gathered"] == [[0.0, 1.0, 4.0, 9.0], [16.0, 25.0, 36.0]] and r1["gathered"] is None
    assert r0["bcast"] == r1["bcast"] == [0, 10, 20]
    assert r0["all"] == r1["all"] == [0, 2]
    assert r0["on_main"] == r1["on_main"] == "computed by 0"
    assert r0["on_main_error"] == r1["on_main_error"] == ["DataError", "bad data on rank 0"]
    assert r0["all_ranks_error"] == r1["all_ranks_error"] == ["DataError", "rank 1: rank-1 state"]
    assert r0["bn"] == r1["bn"] == [[1.5] * 3, [2.0] * 3, 7]


def test_single_process_context(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_from_env("cpu")
    assert ctx == DistContext() and ctx.is_main and not ctx.distributed
    assert current() == DistContext()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UsageError, match="WORLD_SIZE"):
        init_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(UsageError, match="RANK"):
        init_from_env("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UsageError, match="MASTER_ADDR"):
        init_from_env("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(UsageError, match="mps"):
        init_from_env("mps")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            init_from_env("cuda")
