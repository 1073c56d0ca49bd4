"""Per-sample random streams: attack outcomes must not depend on batching or sharding (in-process)."""

from __future__ import annotations

import pytest
import torch

from robkd.attacks import PGD, Suite, make_attack
from robkd.attacks.noise import SampleNoise, stream_seed
from robkd.distributed import merge_suite_results, shard_bounds, shard_positions, strided_positions
from robkd.errors import UsageError


def test_stream_seed_mixes_every_key():
    seeds = {stream_seed(s, i, k) for s in range(3) for i in range(50) for k in range(3)}
    assert len(seeds) == 3 * 50 * 3
    assert all(0 <= v < 2**63 for v in seeds)
    assert stream_seed(0, 1, 2) == stream_seed(0, 1, 2)
    assert stream_seed(0, 1, 2) != stream_seed(0, 2, 1)


def test_sample_noise_depends_on_seed_id_and_draw_number_only():
    full = SampleNoise(7, [10, 11, 12, 13])
    a = full.rand((4, 5))
    # a sample drawn alone, in another batch order, gets the same first draw
    alone = SampleNoise(7, [12]).rand((1, 5))
    assert torch.equal(alone[0], a[2])
    other_order = SampleNoise(7, [13, 10]).rand((2, 5))
    assert torch.equal(other_order[0], a[3]) and torch.equal(other_order[1], a[0])
    # the reference value: a generator seeded from (seed, id, 0)
    ref = torch.rand(5, generator=torch.Generator().manual_seed(stream_seed(7, 11, 0)))
    assert torch.equal(a[1], ref)
    # the second draw differs from the first; subsets share the per-sample counters
    sub = full.subset(torch.tensor([1, 3]))
    second = sub.rand((2, 5))
    assert not torch.equal(second[0], a[1])
    assert torch.equal(second[0], torch.rand(5, generator=torch.Generator().manual_seed(stream_seed(7, 11, 1))))
    third_all = full.randn((4, 2))  # rows 1 and 3 are on their third draw, rows 0 and 2 on their second
    assert torch.equal(third_all[0], torch.randn(2, generator=torch.Generator().manual_seed(stream_seed(7, 10, 1))))
    assert torch.equal(third_all[1], torch.randn(2, generator=torch.Generator().manual_seed(stream_seed(7, 11, 2))))
    # another seed gives other noise
    assert not torch.equal(SampleNoise(8, [10]).rand((1, 5))[0], a[0])
    assert full.subset(torch.tensor([True, False, True, False])).ids.tolist() == [10, 12]


def test_sample_noise_rejects_bad_input():
    with pytest.raises(UsageError):
        SampleNoise(0, torch.tensor([0.5, 1.0]))
    with pytest.raises(UsageError):
        SampleNoise("0", [1])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="rows"):
        SampleNoise(0, [1, 2]).rand((3, 4))
    with pytest.raises(UsageError, match="out of range"):
        SampleNoise(0, [1, 2]).subset([5])


def test_shards_cover_every_sample_once():
    for n in (0, 1, 5, 10, 11):
        for w in (1, 2, 3, 4):
            blocks = [shard_positions(n, r, w) for r in range(w)]
            assert torch.equal(torch.cat(blocks), torch.arange(n))
            sizes = [b.numel() for b in blocks]
            assert max(sizes) - min(sizes) <= 1
            strided = torch.cat([strided_positions(n, r, w) for r in range(w)]).sort().values
            assert torch.equal(strided, torch.arange(n))
    assert shard_bounds(10, 2, 3) == (7, 10)
    with pytest.raises(UsageError):
        shard_positions(10, 3, 3)
    with pytest.raises(UsageError):
        shard_positions(-1, 0, 1)


def test_pgd_random_starts_do_not_depend_on_batching(trained_mlp, fmnist_test):
    x, y = fmnist_test.float_x(slice(0, 40)), fmnist_test.y[:40]
    attack = PGD("Linf", 0.03, steps=3, restarts=2, batch_size=40, seed=3)
    full = attack.run(trained_mlp, x, y)
    # other batch sizes, and a shard that names its rows by their ids in the whole set
    small = PGD("Linf", 0.03, steps=3, restarts=2, batch_size=7, seed=3).run(trained_mlp, x, y)
    assert torch.equal(small.success, full.success)
    assert torch.allclose(small.x_adv, full.x_adv, atol=1e-6)
    ids = torch.arange(13, 40)
    shard = attack.run(trained_mlp, x[13:], y[13:], sample_ids=ids)
    assert torch.equal(shard.success, full.success[13:])
    assert torch.allclose(shard.x_adv, full.x_adv[13:], atol=1e-6)
    # the ids matter: naming the rows differently changes the random starts
    renamed = attack.run(trained_mlp, x[13:], y[13:], sample_ids=ids + 1000)
    assert not torch.allclose(renamed.x_adv, full.x_adv[13:])
    with pytest.raises(UsageError, match="sample_ids"):
        attack.run(trained_mlp, x, y, sample_ids=torch.arange(3))
    with pytest.raises(UsageError, match="sample_ids"):
        attack.run(trained_mlp, x, y, sample_ids=torch.zeros(40))


def test_l2_uniform_start_is_per_sample(trained_mlp, fmnist_test):
    x, y = fmnist_test.float_x(slice(0, 12)), fmnist_test.y[:12]
    a = make_attack("pgd-2x3", "L2", 0.5, random_start="uniform", seed=1)
    full = a.run(trained_mlp, x, y)
    part = a.run(trained_mlp, x[5:], y[5:], sample_ids=torch.arange(5, 12))
    assert torch.allclose(part.x_adv, full.x_adv[5:], atol=1e-6)


def test_sharded_suite_merges_to_the_whole_set_result(trained_cnn, fmnist_test):
    n = 60
    x, y = fmnist_test.float_x(slice(0, n)), fmnist_test.y[:n]
    suite = Suite(["fgsm", "pgd-3x2"], "Linf", seed=5, batch_size=16, progress=False)
    radii = [0.02, 0.06]
    whole = suite.run(trained_cnn, x, y, radii)
    parts, positions = [], []
    for rank in range(3):
        pos = shard_positions(n, rank, 3)
        parts.append(suite.run(trained_cnn, x[pos], y[pos], radii, sample_ids=pos).to_tensors())
        positions.append(pos)
    merged = merge_suite_results(parts, positions, n)
    assert torch.equal(merged.broken_by, whole.broken_by)
    assert torch.equal(merged.clean_correct, whole.clean_correct)
    assert torch.allclose(merged.x_adv, whole.x_adv, atol=1e-6)
    assert torch.equal(merged.adv_radius.isnan(), whole.adv_radius.isnan())
    assert merged.done == whole.done and merged.robust_accuracy() == whole.robust_accuracy()
    # a sample broken by pgd only at some radius shows the cascade ran on the shards too
    assert bool((whole.broken_by == 1).any()) and bool((whole.broken_by == 0).any())
    with pytest.raises(UsageError, match="covered by no rank"):
        merge_suite_results(parts[:2], positions[:2], n)
