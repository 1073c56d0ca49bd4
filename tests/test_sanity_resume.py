"""The audit's sanity phase: progress events per (model, check), every check saved for --resume, and a resume
that only adds a gate redoes no sanity work while a changed --sanity-n recomputes."""

from __future__ import annotations

from robkd.auditing import audit

FAST = dict(data="fashion-mnist-slice", n=48, eps=[0.02, 0.05], attacks=["fgsm", "pgd-3"], batch_size=48, sanity_n=8)
CHECKS = ("cheap checks", "large radius", "more steps", "monotonicity")
ROLES = ("teacher", "student")


class _NoWork(Exception):
    pass


def test_sanity_events_state_and_resume(trained_cnn, trained_mlp, tmp_path, monkeypatch):
    import robkd.analysis.sanity as sanity
    import robkd.attacks.base as base

    events: list[tuple[str, dict]] = []
    out = tmp_path / "a"
    first = audit(trained_cnn, trained_mlp, out_dir=out, on_event=lambda kind, info: events.append((kind, dict(info))),
                  **FAST)

    # progress: every sanity phase names its model and check, has a total and is closed by a done
    mine = [(k, i) for k, i in events if str(i.get("phase", "")).startswith("sanity ")]
    starts = [i for k, i in mine if k == "start"]
    phases = {i["phase"] for i in starts}
    assert {f"sanity {r} {c}" for r in ROLES for c in ("cheap checks", "monotonicity")} <= phases
    assert phases <= {f"sanity {r} {c}" for r in ROLES for c in CHECKS}
    for i in starts:
        assert i["model"] in ROLES and i["stage"].startswith(f"sanity: {i['check']}") and i["total"] > 0
        if i["check"] != "cheap checks":
            assert i["attack"].startswith("pgd-") and i["radius"] > 0
    depth = 0
    for kind, info in mine:
        depth += {"start": 1, "done": -1}.get(kind, 0)
        assert depth in (0, 1)
        if kind == "advance":
            assert depth == 1 and info["n"] > 0
    assert depth == 0
    saved = [i["stage"] for k, i in events if k == "checkpoint" and str(i.get("stage", "")).startswith("sanity: ")]
    assert sorted(saved) == sorted(f"sanity: {c}" for _ in ROLES for c in CHECKS)
    assert sorted(p.name for p in (out / "state").glob("sanity-*.json")) == sorted(
        f"sanity-{r}-{c.replace(' ', '-')}.json" for r in ROLES for c in CHECKS)

    # a resume that only adds a gate: no attack and no cheap check may run
    def forbidden(*a, **k):
        raise _NoWork()

    with monkeypatch.context() as m:
        m.setattr(base.Attack, "run", forbidden)
        m.setattr(sanity, "pre_checks", forbidden)
        again = audit(trained_cnn, trained_mlp, out_dir=out, resume=True, gates=["student.clean >= 0"], **FAST)
    assert again.sanity_flags == first.sanity_flags
    assert [g["passed"] for g in again.to_dict()["gates"] if g["gate"] == "student.clean >= 0"] == [True]

    # a changed --sanity-n is not in the state's fingerprint: the checks see their key change and recompute
    calls: list[str] = []
    real_run, real_pre = base.Attack.run, sanity.pre_checks

    def counting_run(self, *a, **k):
        calls.append(self.name)
        return real_run(self, *a, **k)

    def counting_pre(*a, **k):
        calls.append("cheap")
        return real_pre(*a, **k)

    monkeypatch.setattr(base.Attack, "run", counting_run)
    monkeypatch.setattr(sanity, "pre_checks", counting_pre)
    audit(trained_cnn, trained_mlp, out_dir=out, resume=True, **{**FAST, "sanity_n": 10})
    assert calls.count("cheap") == 2 and "pgd-20" in calls and not {"fgsm", "pgd-3"} & set(calls)


def test_sanity_without_an_output_directory_still_reports(trained_cnn, trained_mlp):
    events: list[tuple[str, dict]] = []
    audit(trained_cnn, trained_mlp, on_event=lambda kind, info: events.append((kind, dict(info))), **FAST)
    assert any(k == "start" and i.get("phase") == "sanity student monotonicity" for k, i in events)
    assert not any(k == "checkpoint" and str(i.get("stage", "")).startswith("sanity") for k, i in events)


def test_sanity_n_zero_saves_only_the_cheap_checks(trained_cnn, trained_mlp, tmp_path):
    out = tmp_path / "z"
    audit(trained_cnn, trained_mlp, out_dir=out, **{**FAST, "sanity_n": 0})
    assert sorted(p.name for p in (out / "state").glob("sanity-*.json")) == [
        "sanity-student-cheap-checks.json", "sanity-teacher-cheap-checks.json"]


def test_a_resumed_sanity_phase_calls_no_model(trained_cnn, trained_mlp, tmp_path):
    """stages.sanity on a resumed state: not a single forward pass of either model (counted by hooks)."""
    from robkd.auditing import stages
    from robkd.auditing.config import AuditConfig
    from robkd.auditing.plan import make_plan
    from robkd.auditing.store import StateStore

    cfg = AuditConfig(**{**FAST, "attacks": ["pgd-3"], "n": 32})
    plan = make_plan(cfg, trained_cnn, trained_mlp)
    suites = {r: plan.suite.run(plan.models[r], plan.x, plan.y, list(plan.radii)) for r in ROLES}
    fresh = StateStore(tmp_path / "state", dict(plan.fingerprint))
    fresh.open(resume=False)
    calls = {"n": 0}
    hooks = [plan.models[r].register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1)) for r in ROLES]
    try:
        first = stages.sanity(plan, suites, fresh)
        assert calls["n"] > 0
        calls["n"] = 0
        resumed = StateStore(tmp_path / "state", dict(plan.fingerprint))
        resumed.open(resume=True)
        assert stages.sanity(plan, suites, resumed) == first and calls["n"] == 0
        # the suite's outcomes are part of the key: another suite result recomputes the checks that read it
        other = {**suites, "student": plan.suite.run(plan.models["student"], plan.x, plan.y, [0.01, 0.05])}
        stages.sanity(plan, other, resumed)
        assert calls["n"] > 0
    finally:
        for h in hooks:
            h.remove()
