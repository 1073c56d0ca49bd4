"""``eps_warmup``: the training radius ramps linearly over a fraction of the run (PGD-AT from scratch)."""

from __future__ import annotations

import json

import pytest
import torch

from robkd.distill import TrainConfig, Trainer, load_train_state
from robkd.distill import objectives as O
from robkd.errors import UsageError

from helpers import mlp


@pytest.mark.parametrize("warmup,total,expected", [
    (0.0, 4, [1, 1, 1, 1]),
    (0.5, 8, [0.25, 0.5, 0.75, 1, 1, 1, 1, 1]),  # K = 4 steps
    (1.0, 3, [1 / 3, 2 / 3, 1]),
    (0.3, 10, [1 / 3, 2 / 3, 1, 1]),  # K = round(3.0) = 3
    (0.01, 10, [1, 1]),  # K rounds to 0: at least one step, so the first step already has the full radius
])
def test_the_ramp_by_hand(warmup, total, expected):
    c = TrainConfig(method="at", eps_warmup=warmup)
    assert [c.eps_scale(k, total) for k in range(len(expected))] == pytest.approx(expected, abs=1e-12)


def _at(tmp_path, name, split, **kw):
    cfg = TrainConfig(method="at", epochs=2, batch_size=64, lr=0.05, steps=3, val_n=0, select="last", **kw)
    net = mlp(3)
    tr = Trainer(net, cfg, split[0], None, dataset="fashion-mnist", default_eps=0.1, state_path=tmp_path / f"{name}.pt",
                 show_progress=False)
    return net, tr


def test_a_warm_up_step_is_adversarial_training_at_the_reduced_radius(tmp_path, slice_split):
    """Step 0 of a warm-up over 8 steps trains exactly as PGD-AT at radius eps/8 and step size step/8 does."""
    warm, t_warm = _at(tmp_path, "warm", slice_split, eps_warmup=1.0)  # 2 passes of 4 batches: K = 8
    small, t_small = _at(tmp_path, "small", slice_split, eps=0.1 / 8, step_size=0.025 / 8)
    full, t_full = _at(tmp_path, "full", slice_split)
    for t in (t_warm, t_small, t_full):
        t.fit(max_steps=1)
    for p, q in zip(warm.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert max(float((p - q).detach().abs().max()) for p, q in zip(warm.parameters(), full.parameters())) > 1e-5


def test_records_show_the_radius_and_validation_keeps_the_full_one(slice_split):
    cfg = TrainConfig(method="at", epochs=2, batch_size=64, lr=0.05, steps=2, val_n=32, val_steps=2, eps_warmup=1.0)
    log = Trainer(mlp(4), cfg, slice_split[0], slice_split[1], dataset="fashion-mnist", default_eps=0.1,
                  show_progress=False).fit()
    # pass 1 ends at step 4 of K = 8 (radius 0.05), pass 2 at the full radius
    assert [r["train_eps"] for r in log.records] == pytest.approx([0.05, 0.1])
    assert log.config["eps"] == pytest.approx(0.1)  # validation attacks at config.eps
    plain = Trainer(mlp(4), TrainConfig(method="at", epochs=1, batch_size=64, val_n=0, select="last"), slice_split[0], None,
                    dataset="fashion-mnist", default_eps=0.1, show_progress=False).fit()
    assert "train_eps" not in plain.records[0]  # no warm-up: the log is unchanged


def test_fast_ard_free_steps_stay_inside_the_reduced_ball(slice_split, slice_teacher):
    tr, _ = slice_split
    cfg = TrainConfig(method="fast-ard", epochs=2, replays=3, batch_size=16, lr=0.05, val_n=0, select="last", eps_warmup=1.0)
    trainer = Trainer(mlp(6), cfg, tr, None, slice_teacher, dataset="fashion-mnist", default_eps=0.1, show_progress=False)
    opt = torch.optim.SGD(trainer.student.parameters(), lr=0.05)
    ctx = O.StepContext(trainer.student, slice_teacher, trainer.config, torch.Generator(), None, eps_scale=0.25)
    x, y = tr.float_x(slice(0, 16)), tr.y[:16]
    delta, _ = trainer._fast_ard_batch(ctx, opt, x, y, None, None)
    assert float(delta.abs().max()) <= 0.025 + 1e-6  # free steps of eps/4 inside the ball of eps/4
    assert float(delta.abs().max()) > 0.02  # ... and they reach it (sign steps of 0.025)


@pytest.mark.parametrize("kw,match", [
    (dict(method="at", eps_warmup=1.5), "eps_warmup"), (dict(method="at", eps_warmup=-0.1), "eps_warmup"),
    (dict(method="kd", eps_warmup=0.2), "without one"), (dict(method="st", eps_warmup=0.2), "without one"),
])
def test_bad_warm_up(kw, match):
    with pytest.raises(UsageError, match=match):
        TrainConfig(**kw).resolve(0.1, "fashion-mnist")


def test_a_state_from_before_the_option_resumes_at_its_default(tmp_path, slice_split):
    """A state written by a robkd without ``eps_warmup`` resumes when the option is at its default (0), not otherwise."""
    net, t = _at(tmp_path, "old", slice_split)
    t.fit(max_steps=2)
    st = load_train_state(tmp_path / "old.pt")
    cfg = json.loads(st["config"])
    del cfg["eps_warmup"]
    st["config"] = json.dumps(cfg, sort_keys=True)
    torch.save(st, tmp_path / "old.pt")
    _, t2 = _at(tmp_path, "old", slice_split)
    assert t2.fit(resume=True).finished
    t.fit(max_steps=1)  # a fresh state without the key again, resumed with a warm-up: refused, naming the option
    st = load_train_state(tmp_path / "old.pt")
    cfg = json.loads(st["config"])
    del cfg["eps_warmup"]
    st["config"] = json.dumps(cfg, sort_keys=True)
    torch.save(st, tmp_path / "old.pt")
    _, t3 = _at(tmp_path, "old", slice_split, eps_warmup=0.5)
    with pytest.raises(UsageError, match="eps_warmup"):
        t3.fit(resume=True)
