"""Trainer: exact resume, schedule, selection, frozen teacher, Fast-ARD replay, augmentation, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from robkd.distill import TrainConfig, Trainer, evaluate_robust, load_train_state
from robkd.distill import objectives as O
from robkd.distill.augment import augment_batch
from robkd.errors import IncompatibleModelsError, UsageError
from robkd.models import build_model

from helpers import mlp


@pytest.fixture
def split(slice_split):
    return slice_split


@pytest.fixture
def teacher(slice_teacher):
    return slice_teacher


SMALL = dict(epochs=2, batch_size=64, lr=0.05, steps=2, val_n=64, val_steps=2)


@pytest.mark.parametrize("method,extra", [
    ("ard", {"alpha": 0.7}),
    ("kdiga-ardc", {}),
    ("kdiga-arda", {}),
    ("fast-ard", {"replays": 2, "epochs": 4}),
    ("trades", {"augment": "crop-flip"}),
    ("at", {"eps_warmup": 0.75}),  # stopped inside the radius warm-up
    ("fast-ard", {"replays": 2, "epochs": 4, "eps_warmup": 0.5}),
])
def test_resume_equals_uninterrupted(tmp_path, split, teacher, method, extra):
    tr, va = split
    cfg = TrainConfig(method=method, **{**SMALL, **extra})
    t = teacher if cfg.uses_teacher else None
    a = mlp(1)
    log_a = Trainer(a, cfg, tr, va, t, dataset="fashion-mnist", default_eps=0.1, state_path=tmp_path / "a.pt", show_progress=False).fit()
    # interrupted run: stop mid-epoch (after 3 batches of 4), then again in the next epoch, resume with a fresh process-like state
    b = mlp(1)
    Trainer(b, cfg, tr, va, t, dataset="fashion-mnist", default_eps=0.1, state_path=tmp_path / "b.pt", show_progress=False).fit(max_steps=3)
    torch.manual_seed(999)  # disturb the global RNG as a new process would
    b2 = mlp(77)  # different init: everything must come from the checkpoint
    part = Trainer(b2, cfg, tr, va, t, dataset="fashion-mnist", default_eps=0.1, state_path=tmp_path / "b.pt", show_progress=False).fit(resume=True, max_steps=2)
    assert not part.finished
    b3 = mlp(78)
    log_b = Trainer(b3, cfg, tr, va, t, dataset="fashion-mnist", default_eps=0.1, state_path=tmp_path / "b.pt", show_progress=False).fit(resume=True)
    assert log_b.finished and log_a.finished
    sa, sb = a.state_dict(), b3.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    keys = [k for k in log_a.records[0] if k not in ("train_seconds", "images_per_s")]
    assert [{k: r[k] for k in keys} for r in log_a.records] == [{k: r[k] for k in keys} for r in log_b.records]
    state = load_train_state(tmp_path / "b.pt")  # weights_only=True
    assert state["finished"] and state["epoch"] == cfg.passes


def test_multistep_schedule_really_decays(split):
    cfg = TrainConfig(method="st", epochs=4, batch_size=128, lr=0.1, milestones=(0.5, 0.75), val_n=0, select="last")
    log = Trainer(mlp(0), cfg, split[0], None, show_progress=False).fit()
    assert [r["lr"] for r in log.records] == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_milestones_landing_on_one_epoch_apply_both_decays(split):
    """3 passes, milestones at 0.5 and 0.75: both round to pass 2, where the rate must fall by gamma^2
    (a set of milestones would drop one decay, like the reference code's LR helper)."""
    cfg = TrainConfig(method="st", epochs=3, batch_size=128, lr=0.1, milestones=(0.5, 0.75), val_n=0, select="last")
    log = Trainer(mlp(0), cfg, split[0], None, show_progress=False).fit()
    assert [r["lr"] for r in log.records] == pytest.approx([0.1, 0.1, 0.001])


def test_val_robust_selection_returns_best_epoch(split):
    tr, va = split
    cfg = TrainConfig(method="at", epochs=3, batch_size=64, lr=0.05, steps=2, val_n=64, val_steps=3, select="val-robust")
    m = mlp(2)
    tl = Trainer(m, cfg, tr, va, dataset="fashion-mnist", default_eps=0.1, show_progress=False).fit()
    best = max(tl.records, key=lambda r: (r["val_robust"], r["val_clean"]))
    assert tl.selected_epoch == best["epoch"]
    clean, rob = evaluate_robust(m, va, norm="Linf", eps=0.1, steps=3, step_size=0.025, seed=cfg.seed + 12345)
    assert (clean, rob) == (best["val_clean"], best["val_robust"])
    assert not m.training


def test_teacher_is_frozen_and_cached(split, teacher):
    t = copy.deepcopy(teacher)
    for p in t.parameters():
        p.requires_grad_(True)
    t.train()
    before = {k: v.clone() for k, v in t.state_dict().items()}
    cfg = TrainConfig(method="kdiga", epochs=1, batch_size=64, lr=0.05, val_n=0, select="last")
    tr = Trainer(mlp(3), cfg, split[0], None, t, dataset="fashion-mnist", default_eps=0.1, show_progress=False)
    assert tr.use_cache
    tr.fit()
    assert not t.training
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())


def _bn_dropout_teacher() -> torch.nn.Module:
    torch.manual_seed(8)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.Linear(32, 10))


@pytest.mark.parametrize("method,extra", [("kdiga-arda", {}), ("kdiga", {"cache_teacher": False}), ("kdiga-arda", {"cache_teacher": True})])
def test_bn_dropout_teacher_is_frozen_without_cache(split, method, extra):
    """A BatchNorm + Dropout teacher with requires_grad=True, in train mode, teaching with the cache off."""
    t = _bn_dropout_teacher()
    t.train()
    assert all(p.requires_grad for p in t.parameters())
    before = {k: v.clone() for k, v in t.state_dict().items()}
    modes: list[tuple[bool, ...]] = []
    t.register_forward_pre_hook(lambda m, inp: modes.append(tuple(sub.training for sub in m.modules())))
    cfg = TrainConfig(method=method, epochs=1, batch_size=64, lr=0.05, steps=2, val_n=0, select="last", **extra)
    tr = Trainer(mlp(3), cfg, split[0], None, t, dataset="fashion-mnist", default_eps=0.1, show_progress=False)
    assert not tr.use_cache and tr.config.cache_teacher is False
    log = tr.fit()
    assert log.finished and log.global_step == 4
    assert modes and not any(any(m) for m in modes)  # every teacher forward in eval mode (BatchNorm and Dropout too)
    assert not t.training
    assert all(p.grad is None for p in t.parameters())
    after = t.state_dict()
    assert after.keys() == before.keys()
    for k in before:  # running_mean / running_var / num_batches_tracked untouched, weights too
        assert torch.equal(before[k], after[k]), k


def test_recorded_cache_teacher_is_the_effective_value(split, teacher):
    """cache_teacher in the resolved config, the log and the provenance says whether the cache was used."""
    tr, _ = split
    cases = [("kdiga-arda", True, False), ("kdiga-arda", None, False), ("kdiga", None, True), ("kdiga", True, True),
             ("kdiga", False, False), ("ard", None, True)]
    for method, asked, used in cases:
        t = Trainer(mlp(3), TrainConfig(method=method, cache_teacher=asked, val_n=0, select="last"), tr, None, teacher,
                    dataset="fashion-mnist", default_eps=0.1, show_progress=False)
        assert (t.use_cache, t.config.cache_teacher) == (used, used), (method, asked)
    st = Trainer(mlp(3), TrainConfig(method="st", val_n=0, select="last"), tr, None, dataset="fashion-mnist", show_progress=False)
    assert st.config.cache_teacher is False
    crop = Trainer(mlp(3), TrainConfig(method="kd", augment="crop", val_n=0, select="last"), tr, None, teacher,
                   dataset="fashion-mnist", default_eps=0.1, show_progress=False)
    assert crop.config.cache_teacher is False
    # end to end: the saved provenance of a kdiga-arda run asked to cache records that it did not
    from robkd.distill import train

    res = train("kdiga-arda", "robkd:mlp", tr, 1, None, teacher=teacher, arch_kwargs={"hidden": [16]}, cache_teacher=True,
                val_n=0, select="last", steps=1, batch_size=64, eps=0.1, show_progress=False)
    assert res.model.meta.provenance["hyperparameters"]["cache_teacher"] is False
    assert res.log.config["cache_teacher"] is False


def test_cache_does_not_change_the_objective(split, teacher):
    tr, _ = split
    cfg = TrainConfig(method="kdiga", epochs=1, batch_size=64, lr=0.05, val_n=0, select="last").resolve(0.1, "fashion-mnist")
    cache = O.TeacherCache(teacher, tr, grads=True)
    idx = torch.tensor([5, 17, 100, 3])
    x, y = tr.float_x(idx), tr.y[idx]
    s = mlp(4)
    ctx_c = O.StepContext(s, teacher, cfg, torch.Generator().manual_seed(0), cache)
    ctx_n = O.StepContext(s, teacher, cfg, torch.Generator().manual_seed(0), None)
    lc, tc = O.obj_kdiga(ctx_c, x, y, idx)
    ln, tn = O.obj_kdiga(ctx_n, x, y, None)
    assert lc.item() == pytest.approx(ln.item(), rel=1e-5)
    assert tc.keys() == {"ce", "kl", "iga"}


def test_fast_ard_replay_keeps_perturbation(split, teacher):
    """m replays of one batch = m free steps; checked against an explicit re-implementation."""
    tr, _ = split
    cfg = TrainConfig(method="fast-ard", epochs=2, replays=3, batch_size=8, lr=0.05, val_n=0, select="last", temperature=2.0)
    trainer = Trainer(mlp(6), cfg, tr, None, teacher, dataset="fashion-mnist", default_eps=0.1, show_progress=False)
    c = trainer.config
    assert c.step_size == pytest.approx(0.1)  # free training steps by eps
    x, y = tr.float_x(slice(0, 8)), tr.y[:8]
    ref = copy.deepcopy(trainer.student)
    opt = torch.optim.SGD(trainer.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ctx = O.StepContext(trainer.student, teacher, c, torch.Generator(), None)
    trainer.student.train()
    delta, terms = trainer._fast_ard_batch(ctx, opt, x, y, None, None)
    # explicit free training: delta starts at 0, ascends the loss by eps*sign(grad), clipped to the ball and [0,1]
    d = torch.zeros_like(x)
    t_logits = teacher(x).detach()
    ref.train()
    deltas = []
    for _ in range(3):
        xin = (x + d).clamp(0, 1).requires_grad_(True)
        p_t = torch.softmax(t_logits / 2.0, 1)
        log_q = torch.log_softmax(ref(xin) / 2.0, 1)
        loss = 4.0 * (p_t * (torch.log(p_t) - log_q)).sum(1).mean()
        ref_opt.zero_grad()
        loss.backward()
        d = ((x + d + 0.1 * xin.grad.sign()).clamp(x - 0.1, x + 0.1).clamp(0, 1) - x).detach()
        deltas.append(d)
        ref_opt.step()
    assert not torch.equal(deltas[0], deltas[1])  # the perturbation moves on from replay to replay
    assert torch.allclose(delta[:8], deltas[-1], atol=1e-6)
    assert float(delta.abs().max()) <= 0.1 + 1e-6
    for p, q in zip(trainer.student.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    # the perturbation persists into the next batch: the second batch's free steps start from the carried delta
    x2, y2 = tr.float_x(slice(8, 16)), tr.y[8:16]
    fresh_student, fresh_opt = copy.deepcopy((trainer.student, opt))  # the same state, for a run from delta=None
    fresh_ctx = O.StepContext(fresh_student, teacher, c, torch.Generator(), None)
    delta2, _ = trainer._fast_ard_batch(ctx, opt, x2, y2, None, delta)
    delta2_fresh, _ = trainer._fast_ard_batch(fresh_ctx, fresh_opt, x2, y2, None, None)
    t2 = teacher(x2).detach()
    p_t2 = torch.softmax(t2 / 2.0, 1)
    for _ in range(3):  # explicit free-AT loop from the carried d (= deltas[-1]); x2 + d may leave [0,1]: the step
        xin = (x2 + d).clamp(0, 1).requires_grad_(True)  # is taken from the input actually used, x_in = clamp(x2 + d)
        loss = 4.0 * (p_t2 * (torch.log(p_t2) - torch.log_softmax(ref(xin) / 2.0, 1))).sum(1).mean()
        ref_opt.zero_grad()
        loss.backward()
        d = ((xin.detach() + 0.1 * xin.grad.sign()).clamp(x2 - 0.1, x2 + 0.1).clamp(0, 1) - x2).detach()
        ref_opt.step()
    assert torch.allclose(delta2[:8], d, atol=1e-6)
    for p, q in zip(trainer.student.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    # ... and a run started from delta=None ends elsewhere (so the carry is what the comparison above checks)
    assert (delta2_fresh[:8] - delta2[:8]).abs().max() > 0.05
    assert any((p - q).abs().max() > 1e-4 for p, q in zip(fresh_student.parameters(), trainer.student.parameters()))


def test_augmentation_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    assert torch.equal(augment_batch(x, "none", g), x)
    f = augment_batch(x, "flip", torch.Generator().manual_seed(1))
    for i in range(16):
        assert torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(2))
    c = augment_batch(x, "crop", torch.Generator().manual_seed(2))
    assert c.shape == x.shape
    for i in range(16):  # every crop is a shift of the image by at most 2 px, zero-filled
        ok = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                pad = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
                if torch.equal(c[i], pad[:, 2 + dy : 30 + dy, 2 + dx : 30 + dx]):
                    ok = True
        assert ok


def test_bad_inputs(split, teacher):
    tr, va = split
    with pytest.raises(UsageError):
        Trainer(mlp(0), TrainConfig(method="kd"), tr, va, None, default_eps=0.1)
    with pytest.raises(UsageError):
        Trainer(mlp(0), TrainConfig(method="st"), tr, va, teacher, default_eps=0.1)
    with pytest.raises(UsageError):
        TrainConfig.from_dict({"method": "st", "learning_rate": 0.1})
    with pytest.raises(UsageError):
        Trainer(mlp(0), TrainConfig(method="st", epochs=0), tr, va, default_eps=0.1)
    with pytest.raises(UsageError):
        Trainer(mlp(0), TrainConfig(method="nope"), tr, va, default_eps=0.1)
    with pytest.raises(UsageError):
        Trainer(mlp(0), TrainConfig(method="at", eps=-1.0), tr, va)
    with pytest.raises(UsageError):
        Trainer(mlp(0), TrainConfig(method="kd", cache_teacher=True, augment="crop"), tr, va, teacher, default_eps=0.1)
    wrong = build_model("robkd:mlp", input_shape=(3, 32, 32), num_classes=10)
    with pytest.raises(IncompatibleModelsError):
        Trainer(wrong, TrainConfig(method="st"), tr, va, default_eps=0.1)


def test_resume_refuses_changed_options(tmp_path, split):
    tr, va = split
    cfg = TrainConfig(method="st", epochs=2, batch_size=64, val_n=0, select="last")
    Trainer(mlp(0), cfg, tr, None, state_path=tmp_path / "s.pt", show_progress=False).fit(max_steps=1)
    cfg2 = TrainConfig(method="st", epochs=2, batch_size=64, val_n=0, select="last", lr=0.5)
    with pytest.raises(UsageError, match="lr"):
        Trainer(mlp(0), cfg2, tr, None, state_path=tmp_path / "s.pt", show_progress=False).fit(resume=True)


def test_resume_refuses_another_teacher_or_dataset(tmp_path, split, teacher):
    from robkd.models.identity import model_sha256

    tr, _ = split
    cfg = TrainConfig(method="kd", epochs=2, batch_size=64, val_n=0, select="last")
    Trainer(mlp(0), cfg, tr, None, teacher, dataset="fashion-mnist", state_path=tmp_path / "s.pt", show_progress=False).fit(max_steps=1)
    st = load_train_state(tmp_path / "s.pt")
    h = model_sha256(teacher)
    assert (st["teacher_sha256"], st["dataset"]) == (h, "fashion-mnist")
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3  # one weight differs
    h2 = model_sha256(other)
    assert h2 != h
    with pytest.raises(UsageError) as e:
        Trainer(mlp(0), cfg, tr, None, other, dataset="fashion-mnist", state_path=tmp_path / "s.pt", show_progress=False).fit(resume=True)
    assert h in str(e.value) and h2 in str(e.value)
    with pytest.raises(UsageError) as e:
        Trainer(mlp(0), cfg, tr, None, teacher, dataset="mnist", state_path=tmp_path / "s.pt", show_progress=False).fit(resume=True)
    assert "'fashion-mnist'" in str(e.value) and "'mnist'" in str(e.value)
    # the same teacher and dataset resume
    log = Trainer(mlp(0), cfg, tr, None, teacher, dataset="fashion-mnist", state_path=tmp_path / "s.pt", show_progress=False).fit(resume=True, max_steps=1)
    assert log.global_step == 2
    # a teacher-less run records no teacher, and checks the dataset too
    cst = TrainConfig(method="st", epochs=2, batch_size=64, val_n=0, select="last")
    Trainer(mlp(0), cst, tr, None, dataset="fashion-mnist", state_path=tmp_path / "t.pt", show_progress=False).fit(max_steps=1)
    assert load_train_state(tmp_path / "t.pt")["teacher_sha256"] is None
    with pytest.raises(UsageError, match="cifar10"):
        Trainer(mlp(0), cst, tr, None, dataset="cifar10", default_eps=0.1, state_path=tmp_path / "t.pt",
                show_progress=False).fit(resume=True)


@pytest.mark.parametrize("epochs,replays,passes", [(10, 4, 3), (5, 2, 3), (9, 2, 5), (8, 4, 2), (2, 4, 1), (1, 4, 1), (7, 1, 7)])
def test_fast_ard_passes_round_up(epochs, replays, passes):
    """Fast-ARD makes ceil(epochs / m) passes: never fewer replayed epochs than asked (Python round would cut 10/4 to 2)."""
    c = TrainConfig(method="fast-ard", epochs=epochs, replays=replays)
    assert c.passes == passes
    assert c.passes * replays >= epochs and (c.passes - 1) * replays < epochs
    assert TrainConfig(method="ard", epochs=epochs, replays=replays).passes == epochs


def test_fast_ard_run_makes_ceil_passes(split, teacher):
    tr, _ = split
    cfg = TrainConfig(method="fast-ard", epochs=5, replays=2, batch_size=128, lr=0.05, val_n=0, select="last")
    log = Trainer(mlp(6), cfg, tr, None, teacher, dataset="fashion-mnist", default_eps=0.1, show_progress=False).fit()
    assert [r["epoch"] for r in log.records] == [1, 2, 3]  # round(2.5) would be 2
    assert log.global_step == 3 * 2  # 3 passes of 2 batches (each batch replayed twice)


def test_fast_ard_runs_the_teacher_once_per_minibatch(split, teacher):
    """The teacher sees the same clean x in all m replays: one teacher forward per minibatch, not m."""
    tr, _ = split
    cfg = TrainConfig(method="fast-ard", epochs=2, replays=3, batch_size=8, lr=0.05, val_n=0, select="last",
                      cache_teacher=False)
    trainer = Trainer(mlp(6), cfg, tr, None, copy.deepcopy(teacher), dataset="fashion-mnist", default_eps=0.1,
                      show_progress=False)
    calls = []
    trainer.teacher.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    ctx = O.StepContext(trainer.student, trainer.teacher, trainer.config, torch.Generator(), None)
    opt = torch.optim.SGD(trainer.student.parameters(), lr=0.05)
    trainer.student.train()
    x, y = tr.float_x(slice(0, 8)), tr.y[:8]
    trainer._fast_ard_batch(ctx, opt, x, y, None, None)
    assert calls == [8]


def test_validation_uses_val_n_samples(split):
    tr, va = split
    t = Trainer(mlp(0), TrainConfig(method="st", epochs=1, val_n=10), tr, va, default_eps=0.1, show_progress=False)
    assert len(t.val_data) == 10 and set(t.val_data.indices.tolist()) <= set(va.indices.tolist())


@pytest.mark.parametrize("method,dataset,tau", [
    ("ard", "cifar10", 30.0), ("fast-ard", "cifar100", 5.0), ("ard", "fashion-mnist", 30.0),
    ("kd", "cifar100", 1.0), ("kdiga", "cifar10", 1.0),
])
def test_default_temperature_follows_the_papers(method, dataset, tau):
    """ARD paper: tau 30 on CIFAR-10, 5 on CIFAR-100; KDIGA paper: tau 1 for KD/KDIGA."""
    eps = 8 / 255 if dataset.startswith("cifar") else 0.1
    assert TrainConfig(method=method).resolve(eps, dataset).temperature == tau
    assert TrainConfig(method=method, temperature=2.0).resolve(eps, dataset).temperature == 2.0


# ----------------------------------------------------------------------------- device
@pytest.mark.parametrize("method,extra", [("ard", {}), ("kdiga", {}), ("fast-ard", {"replays": 2}), ("trades", {})])
def test_explicit_cpu_device_is_bit_identical_to_default(split, teacher, method, extra):
    tr, va = split
    base = dict(epochs=1, batch_size=64, lr=0.05, steps=2, val_n=32, val_steps=2, **extra)
    t = teacher if method != "trades" else None
    a, b = mlp(2), mlp(2)
    log_a = Trainer(a, TrainConfig(method=method, **base), tr, va, t, dataset="fashion-mnist", default_eps=0.1,
                    show_progress=False).fit()
    tb = Trainer(b, TrainConfig(method=method, device="cpu", **base), tr, va, t, dataset="fashion-mnist", default_eps=0.1,
                 show_progress=False)
    log_b = tb.fit()
    assert tb.device == torch.device("cpu") and log_a.config["device"] == log_b.config["device"] == "cpu"
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    keys = [k for k in log_a.records[0] if k not in ("train_seconds", "images_per_s")]
    assert [{k: r[k] for k in keys} for r in log_a.records] == [{k: r[k] for k in keys} for r in log_b.records]


def test_bad_device_is_a_usage_error(split):
    tr, _ = split
    bad = ["gpu", "meta", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])
    for name in bad:
        with pytest.raises(UsageError) as e:
            Trainer(mlp(0), TrainConfig(method="st", device=name, val_n=0, select="last"), tr, None, default_eps=0.1)
        assert "\n" not in str(e.value) and name in str(e.value)
    with pytest.raises(UsageError):
        TrainConfig(method="st", device=3).resolve(0.1, None)  # type: ignore[arg-type]
    assert TrainConfig(method="st", device=torch.device("cpu")).resolve(0.1, None).device == "cpu"
    assert TrainConfig(method="st", device=" CPU ").resolve(0.1, None).device == "cpu"


def test_state_holds_cpu_tensors_and_resumes_when_the_device_changed(tmp_path, split, teacher):
    """The device may change on resume (CUDA -> CPU is checked on a GPU in tests/test_train_device.py)."""
    tr, va = split
    cfg = TrainConfig(method="fast-ard", epochs=2, replays=2, batch_size=64, lr=0.05, val_n=32, val_steps=2)
    a = mlp(1)
    Trainer(a, cfg, tr, va, teacher, dataset="fashion-mnist", default_eps=0.1, show_progress=False).fit()
    path = tmp_path / "s.pt"
    Trainer(mlp(1), cfg, tr, va, teacher, dataset="fashion-mnist", default_eps=0.1, state_path=path,
            show_progress=False).fit(max_steps=2)
    st = torch.load(path, weights_only=True)  # no map_location needed: everything was saved from CPU copies
    tensors = list(st["model"].values()) + [st["delta"]]
    tensors += [v for s in st["optimizer"]["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert st["delta"].numel() and all(t.device.type == "cpu" for t in tensors)
    import json

    saved = json.loads(st["config"])
    assert saved["device"] == "cpu"
    st["config"] = json.dumps({**saved, "device": "cuda"}, sort_keys=True)  # as if saved by a run on a GPU
    torch.save(st, path)
    b = mlp(9)
    log = Trainer(b, cfg, tr, va, teacher, dataset="fashion-mnist", default_eps=0.1, state_path=path,
                  show_progress=False).fit(resume=True)
    assert log.finished
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
