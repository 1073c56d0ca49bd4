"""The default transfer verdict (robustness kept >= 90% at the largest radius), the closing line, and
results files written before the verdict existed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robkd.auditing.render import closing_line
from robkd.auditing.result import AuditResult
from robkd.auditing.verdict import default_verdict
from robkd.report import doc as D
from robkd.report.schema import Results, ResultsError, load_results, validate_results
from robkd.report.summary import verdict
from robkd.utils.stats import clopper_pearson

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "reports" / "demo" / "results.json"


def _without_gates(d: dict) -> dict:
    """The demo's results as an audit without gates, written before the default verdict existed."""
    d = json.loads(json.dumps(d))
    d["gates"], d["config"]["gates"], d["gates_passed"] = [], [], True
    d.pop("default_verdict", None)
    return d


def _box(d: dict) -> tuple[str, str]:
    box = verdict(Results(d))
    return D.to_markdown([box], {}), D.to_html([box], title="t")


def test_default_verdict_of_the_demo_figures():
    """261 of 500 robust for the student, 307 for the teacher at 0.1: kept 261/307 = 85.0% < 90%."""
    d = load_results(DEMO)
    committed = d.pop("default_verdict")  # the audit's own record agrees with a recomputation from the figures
    dv = default_verdict(d)
    same = ("expr", "radius", "threshold", "kept", "passed", "enforced")
    assert {k: dv[k] for k in same} == {k: committed[k] for k in same}
    # the audit judged it with its paired bootstrap (per-sample outcomes); the file alone gets the interval rule
    assert committed["gate"]["method"] == "paired-bootstrap"
    assert dv["expr"] == "student.worst@0.1 >= 0.9*teacher.worst@0.1" and dv["radius"] == 0.1
    assert dv["kept"] == pytest.approx(261 / 307) and dv["threshold"] == 0.9
    assert dv["passed"] is False and dv["enforced"] is False
    g = dv["gate"]
    assert g["short_by"] == pytest.approx(0.9 * 0.614 - 0.522) and g["method"] == "interval"
    d["default_verdict"] = dv
    validate_results(d)
    assert AuditResult(d).exit_code == 0  # shown, not failing
    d["default_verdict"] = {**dv, "enforced": True}
    assert AuditResult(d).exit_code == 1


def test_closing_line_always(tmp_path):
    d = load_results(DEMO)
    assert closing_line(d) == "Verdict: PASS (2/2 gates)"
    bare = _without_gates(d)
    # an old results file without gates or the default verdict still gets a closing line
    assert closing_line(bare) == "No gate set; the student kept 85% of the teacher's robustness at 0.1"
    bare["default_verdict"] = default_verdict(bare)
    assert closing_line(bare) == "No gate set; the student kept 85% of the teacher's robustness at 0.1 (advisory: below 90%)"
    bare["default_verdict"]["enforced"] = True
    assert closing_line(bare) == "Verdict: FAIL: student.worst@0.1 >= 0.9*teacher.worst@0.1 (short by 0.0306)"
    bare["sanity"]["strict"], bare["sanity"]["flags"] = True, [{"code": "x", "message": "m"}]
    assert closing_line(bare).startswith("Verdict: FAIL: the evaluation was flagged under --strict (exit 3); ")


def test_small_sample_verdict_says_how_many_samples():
    """Student 290/500 = 0.58 against 0.9 x 0.614 = 0.553: the point estimates keep 94%, but the 95% bounds
    (0.536 against 0.9 x 0.657 = 0.591) do not decide it."""
    d = _without_gates(load_results(DEMO))
    lo, hi = clopper_pearson(290, 500, 0.95)
    d["student"]["per_radius"][1]["worst"].update(value=0.58, k=290, ci_low=lo, ci_high=hi)
    d["transfer"][1]["ratio"]["value"] = 290 / 307
    dv = default_verdict(d)
    assert dv["passed"] is False and dv["kept"] == pytest.approx(290 / 307)
    assert dv["gate"]["short_by"] is None and dv["gate"]["samples_needed"] > 500
    d["default_verdict"] = dv
    line = closing_line(d)
    assert line.startswith("No gate set; the student kept 94% of the teacher's robustness at 0.1 (advisory: not shown to "
                           "reach 90% with 95% confidence; about ")
    assert f"about {dv['gate']['samples_needed']} samples would decide it" in line


def test_verdict_box_shows_the_default_verdict_without_gates():
    d = _without_gates(load_results(DEMO))
    md, html = _box(d)  # an old file: no default verdict, the box as before
    assert "Verdict: NO GATES" in md and "for information only" in md and "ADVISORY" not in md
    d["default_verdict"] = default_verdict(d)
    md, html = _box(d)
    assert "Verdict: NO GATES" in md and "Verdict: NO GATES" in html
    assert "the student kept 85% of the teacher&#x27;s robustness at 0.1 (advisory: below 90%)" in html or \
        "the student kept 85% of the teacher's robustness at 0.1 (advisory: below 90%)" in html
    assert "ADVISORY FAIL" in md and "student.worst@0.1 &gt;= 0.9*teacher.worst@0.1" in html
    # enforced, it is a gate: the box fails
    d["default_verdict"]["enforced"] = True
    md, html = _box(d)
    assert "Verdict: FAIL" in md and "1 of 1 release gate failed" in md
    # with gates and an advisory default verdict, the box shows the gates only
    g = load_results(DEMO)
    g["default_verdict"] = default_verdict(g)
    assert "ADVISORY" not in _box(g)[0] and "Verdict: PASS" in _box(g)[0]


def test_schema_accepts_old_and_refuses_malformed_default_verdicts():
    d = load_results(DEMO)
    validate_results(d)  # no key: fine
    d["default_verdict"] = None
    validate_results(d)
    dv = default_verdict(d)
    for key, bad in (("passed", "yes"), ("enforced", None), ("kept", -1), ("expr", 3)):
        d["default_verdict"] = {**dv, key: bad}
        with pytest.raises(ResultsError, match=f"default_verdict.{key}"):
            validate_results(d)
    d["default_verdict"] = {**dv, "gate": {**dv["gate"], "samples_needed": 1.5}}
    with pytest.raises(ResultsError, match="default_verdict.gate.samples_needed"):
        validate_results(d)


def test_audit_records_the_default_verdict_and_ends_with_the_closing_line(tmp_path, trained_cnn, trained_mlp, capsys):
    """A real (tiny) audit: the default verdict is judged on the per-sample outcomes (paired bootstrap), the
    terminal ends with the closing line, and enforcing it turns a failure into exit 1."""
    from robkd.cli.main import main
    from robkd.models import save_model

    t = save_model(trained_cnn, tmp_path / "t.safetensors")
    s = save_model(trained_mlp, tmp_path / "s.safetensors")
    common = [str(t), str(s), "--data", "fashion-mnist-slice", "-n", "48", "--eps", "0.02,8/255", "--attacks", "fgsm",
              "--sanity-n", "0", "--no-report"]
    assert main(["audit", *common, "--out", str(tmp_path / "a")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    dv = data["default_verdict"]
    assert dv["expr"] == "student.worst@8/255 >= 0.9*teacher.worst@8/255" and dv["enforced"] is False
    assert dv["gate"]["method"] == "paired-bootstrap" and dv["radius"] == pytest.approx(8 / 255)
    t_k, s_k = data["transfer"][1]["teacher_robust"], data["transfer"][1]["student_robust"]
    assert dv["kept"] == (pytest.approx(s_k / t_k) if t_k else None)
    assert lines[-1] == closing_line(data) and lines[-1].startswith("No gate set; ")
    code = main(["audit", *common, "--out", str(tmp_path / "b"), "--enforce-default-verdict"])
    enforced = json.loads((tmp_path / "b" / "results.json").read_text())
    assert enforced["config"]["enforce_default_verdict"] is True and enforced["default_verdict"]["enforced"] is True
    assert enforced["default_verdict"]["passed"] == dv["passed"]  # same seed, same samples: same verdict
    assert code == (0 if dv["passed"] else 1) == enforced["exit_code"]
