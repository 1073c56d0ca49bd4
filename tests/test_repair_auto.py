"""``robkd repair --method auto``: budget parsing, option checks, the ranking rule recomputed here, exact resume
after a kill, and, at small scale, the bundled KD student reaching a gate that the short KDIGA repair misses."""

from __future__ import annotations

import json

import pytest
import torch

import robkd.cli.main as cli_main
from robkd.data import eval_subset
from robkd.distill import TrainConfig, Trainer, repair
from robkd.distill import auto as A
from robkd.errors import UsageError

from helpers import mlp


@pytest.mark.parametrize("text,sec", [("2h", 7200), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("1.5h", 5400),
                                      ("120", 120), (" 2H ", 7200), (30, 30.0)])
def test_parse_budget(text, sec):
    assert A.parse_budget(text) == pytest.approx(sec)


@pytest.mark.parametrize("text", ["", "abc", "0m", "2d", "-1h", "h", None, "1e400"])
def test_bad_budget_is_a_usage_error(text):
    with pytest.raises(UsageError):
        A.parse_budget(text)


GATE = "student.worst@0.1 >= 0.7*teacher.worst@0.1"


@pytest.mark.parametrize("gates,extra,msg", [
    (None, {}, "give --gate"), (["transfer.ratio@0.1 >= 0.9"], {}, "clean and worst@R"),
    (["student.pgd-20@0.1 >= 0.5"], {}, "clean and worst@R"), ([GATE], {"candidates": []}, "non-empty"),
    ([GATE], {"candidates": [{"method": "fast-ard"}]}, "bad auto candidate"),
    ([GATE], {"candidates": [{"method": "rslad", "lr": 0.1}]}, "objective options"),
    ([GATE], {"trial_epochs": 0}, "trial_epochs"), ([GATE], {"bogus": 1}, "unknown auto option"),
    (["student.worst@0.1 >="], {}, "."),
])
def test_bad_auto_options(gates, extra, msg):
    with pytest.raises(UsageError, match=msg):
        A.AutoOptions.build(gates, "1h", extra)


def test_candidate_keeps_the_users_schedule_and_resets_the_objective():
    base = TrainConfig(method="kd", lr=0.02, steps=3, temperature=4.0, alpha=0.3, lambda_iga=9.0, seed=5)
    c = A.candidate_config(base, {"method": "rslad", "igdm": True}, epochs=2, train_n=None)
    assert (c.method, c.igdm, c.lr, c.steps, c.seed, c.epochs) == ("rslad", True, 0.02, 3, 5, 2)
    r = c.resolve(0.1, "fashion-mnist")  # the user's temperature/alpha do not leak into RSLAD's defaults
    assert r.temperature == 1.0 and r.alpha == pytest.approx(5 / 6) and r.lambda_iga == 1.0


# ----------------------------------------------------------------------------- ranking and resume (tiny MLPs)
@pytest.fixture(scope="module")
def pair(fmnist_train):
    data = eval_subset(fmnist_train, 640, seed=1)
    t = mlp(5, hidden=(48,))
    Trainer(t, TrainConfig(method="at", epochs=2, batch_size=64, lr=0.05, val_n=0, select="last", steps=3), data, None,
            dataset="fashion-mnist", default_eps=0.1, show_progress=False).fit()
    return data, t


SMALL = dict(epochs=1, batch_size=64, lr=0.05, steps=2, val_n=32, val_steps=2, audit=False, show_progress=False)
OPTS = {"candidates": [{"method": "kd"}, {"method": "rslad"}, {"method": "ard", "alpha": 0.5, "temperature": 1.0}],
        "max_rounds": 2, "rank_steps": 5, "max_clean_drop": 0.3}


def _auto(tmp_path, pair, name, resume=False):
    data, t = pair
    return repair(t, mlp(1), method="auto", data=data, out=tmp_path / f"{name}.pt", gate="student.worst@0.1 >= 2*teacher.worst@0.1",
                  budget="10m", auto_options=OPTS, resume=resume, **SMALL)


def test_ranking_rule_and_the_trial_table(tmp_path, pair):
    from scipy.stats import beta

    res = _auto(tmp_path, pair, "a")
    b = res.auto
    assert [t["method"] for t in b["trials"]] == ["kd", "rslad", "ard"] and b["metric"] == "worst@0.1"
    n = b["validation"]["rank_n"]
    for t in b["trials"]:  # the one-sided 95% Clopper-Pearson lower bound, recomputed from k = robust * n
        k = round(t["val_robust"] * n)
        assert t["robust_lower"] == pytest.approx(0.0 if k == 0 else beta.ppf(0.05, k, n - k + 1), abs=1e-12)
        assert t["val_robust"] <= t["val_clean"] and t["eligible"] == (t["clean_drop"] <= 0.3 + 1e-12)
    ok = [t for t in b["trials"] if t["eligible"]]
    best = max(ok, key=lambda t: (t["robust_lower"], t["val_clean"]))
    assert [t["unit"] for t in b["trials"] if t["chosen"]] == [best["unit"]] == [b["chosen"]]
    assert "lower bound" in best["why"]
    # an unreachable gate: the winner is continued for max_rounds rounds, and the best unit is kept
    assert [r["unit"] for r in b["rounds"]] == ["round-0", "round-1"] and "2 continuation round" in b["stopped"]
    units = [best] + b["rounds"]
    kept = max(units, key=lambda u: (u["eligible"], u["robust_lower"], u["val_clean"]))
    assert b["kept"] == kept["unit"]
    assert res.model.meta.provenance["auto"]["chosen"] == b["chosen"]
    table = A.auto_table(b)
    assert table.count("| trial-") == 3 and "**yes**" in table
    # the validation split is carved from the training data: nothing of the test set is read
    assert "never the test set" in b["validation"]["split"]


def test_a_killed_auto_run_resumes_to_the_same_weights(tmp_path, pair, monkeypatch):
    done = _auto(tmp_path, pair, "full")

    class Killed(Trainer):
        def fit(self, *, resume=False, max_steps=None):
            if self.state_path is not None and self.state_path.name.startswith("round-0"):
                super().fit(resume=resume, max_steps=3)
                raise KeyboardInterrupt
            return super().fit(resume=resume, max_steps=max_steps)

    monkeypatch.setattr(A, "Trainer", Killed)
    with pytest.raises(KeyboardInterrupt):
        _auto(tmp_path, pair, "killed")
    saved = json.loads((tmp_path / "killed.pt.state.pt.auto" / "auto.json").read_text())
    assert sorted(saved["units"]) == ["trial-0", "trial-1", "trial-2"]  # every finished trial was kept
    monkeypatch.setattr(A, "Trainer", Trainer)
    calls = []
    orig = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, **kw: calls.append(self.state_path.name) or orig(self, **kw))
    again = _auto(tmp_path, pair, "killed", resume=True)
    assert calls == ["round-0.state.pt", "round-1.state.pt"]  # the finished trials are not run again
    sa, sb = done.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = lambda blk: [{k: v for k, v in t.items() if k != "seconds"} for t in blk["trials"] + blk["rounds"]]  # noqa: E731
    assert strip(done.auto) == strip(again.auto)
    with pytest.raises(UsageError, match="settings differ"):  # other options: refused
        data, t = pair
        repair(t, mlp(1), method="auto", data=data, out=tmp_path / "killed.pt", gate=GATE, budget="10m",
               auto_options={**OPTS, "max_rounds": 3}, resume=True, **SMALL)


# ----------------------------------------------------------------------------- the bundled KD student (small scale)
def _main(argv):
    import importlib.util

    saved = dict(cli_main.COMMANDS)
    cli_main.COMMANDS.clear()
    cli_main.COMMANDS.update({k: v for k, v in saved.items() if importlib.util.find_spec(v) is not None})
    try:
        return cli_main.main(argv)
    finally:
        cli_main.COMMANDS.clear()
        cli_main.COMMANDS.update(saved)


#: the stated budget of the small-scale claim: 5 min of wall clock; the run stops after its 2 rounds (about 15 s of training
#: on one idle core, so a loaded machine does not cut it short)
BUDGET = "5m"


def test_auto_reaches_a_gate_the_short_kdiga_repair_misses(tmp_path):
    pytest.importorskip("robkd.auditing")
    from robkd.zoo import ZOO_DIR

    teacher, student = ZOO_DIR / "teacher.safetensors", ZOO_DIR / "kd_student.safetensors"
    common = dict(data="fashion-mnist-slice", epochs=1, steps=5, lr=0.05, val_n=200, train_n=1000, gate=GATE,
                  audit=True, audit_before=False, show_progress=False,
                  audit_kwargs={"n": 200, "eps": [0.1], "attacks": ["pgd-20"], "sanity_n": 0})
    kd = repair(teacher, student, method="kdiga", lambda_iga=2.0, out=tmp_path / "kdiga.pt",
                audit_out=tmp_path / "kdiga.audit", **common)
    assert not kd.audit.gates_passed  # the short KDIGA repair misses the gate
    cands = [{"method": "kdiga", "lambda_iga": 2.0}, {"method": "adaad"}]
    au = repair(teacher, student, method="auto", budget=BUDGET, auto_options={"candidates": cands, "max_rounds": 2},
                out=tmp_path / "auto.pt", audit_out=tmp_path / "auto.audit", **common)
    assert au.audit.gates_passed and au.audit.exit_code == 0
    res = json.loads((tmp_path / "auto.audit" / "results.json").read_text())
    b = res["auto"]
    assert b == au.auto and b["chosen"] == "trial-1" and b["elapsed_s"] <= A.parse_budget(BUDGET)
    assert [t["method"] for t in b["trials"]] == ["kdiga", "adaad"]
    assert (tmp_path / "auto.audit" / "auto.md").read_text().count("| trial-") == 2
    # the report shows the trial table and why the winner won
    md = (tmp_path / "auto.audit" / "report.md").read_text()
    section = md.split("## Choosing the repair (--method auto)", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| trial-") or line.startswith("| round")]
    assert [r.split("|")[1].strip() for r in rows] == [t["unit"] for t in b["trials"]] + [r["unit"] for r in b["rounds"]]
    assert sum("| yes |" in r for r in rows) == 1 and f"| {b['chosen']} |" in next(r for r in rows if "| yes |" in r)
    assert f"Chosen: {b['chosen']} ({b['why']})" in md
    w_kd = kd.audit.metric("student.worst@0.1").point
    w_au = au.audit.metric("student.worst@0.1").point
    assert w_au > w_kd + 0.05


@pytest.mark.parametrize("extra,msg", [
    (["--method", "kdiga", "--budget", "1h"], "belong to --method auto"),
    (["--method", "auto"], "give --gate"),
    (["--method", "auto", "--gate", GATE, "--budget", "soon"], "bad --budget"),
    (["--method", "auto", "--gate", GATE, "--auto-candidates", "{bad"], "not JSON"),
])
def test_cli_auto_bad_input_exits_2(tmp_path, capsys, extra, msg):
    from robkd.zoo import ZOO_DIR

    rc = _main(["repair", str(ZOO_DIR / "teacher.safetensors"), str(ZOO_DIR / "kd_student.safetensors"), "--out",
                str(tmp_path / "x.pt"), "--data", "fashion-mnist-slice", *extra])
    assert rc == 2 and msg in capsys.readouterr().err


def test_a_round_that_does_not_beat_the_best_ends_the_search(tmp_path, pair, monkeypatch):
    """The next round would start from the same best weights with the same settings and repeat the failed one
    (seen at full scale: 17 identical rounds up to max_rounds), so the search stops there."""
    current = {}
    fit, measure = Trainer.fit, A._measure

    def tracking_fit(self, **kw):
        current["unit"] = self.state_path.name.split(".")[0]
        return fit(self, **kw)

    def worse_rounds(model, data, radii, base, steps):
        figs = measure(model, data, radii, base, steps)
        if current.get("unit", "").startswith("round-"):  # every round scores below the winning trial
            for f in figs.values():
                f.update(k=0, point=0.0, low=0.0, lower_one_sided=0.0)
        return figs

    monkeypatch.setattr(Trainer, "fit", tracking_fit)
    monkeypatch.setattr(A, "_measure", worse_rounds)
    b = _auto(tmp_path, pair, "stall").auto
    assert [r["unit"] for r in b["rounds"]] == ["round-0"]
    assert b["stopped"] == f"round-0 did not beat {b['chosen']}: another round from the same weights would repeat it"
    assert b["kept"] == b["chosen"]
