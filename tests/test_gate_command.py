"""``robkd gate RESULTS --gate ...``: gates judged again from the committed results files, no model loaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from robkd.cli.main import main
from robkd.report.schema import load_results

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "reports" / "demo" / "results.json"
BEFORE = ROOT / "reports" / "demo" / "before" / "results.json"


def _last_line(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.strip()][-1]


def test_no_model_is_loaded(capsys):
    """Judging gates reads the JSON alone: no model module, no attack is imported (beyond what building the
    command-line parser imports)."""
    from robkd.cli.main import build_parser

    build_parser()
    before = set(sys.modules)
    assert main(["gate", str(DEMO), "--gate", "student.clean >= 0.65"]) == 0
    new = set(sys.modules) - before
    assert not any(m.startswith(("robkd.models", "robkd.attacks", "robkd.distill")) for m in new)
    assert _last_line(capsys.readouterr().out) == "Verdict: PASS (1/1 gate)"


def test_passing_and_failing_gates(capsys):
    d = load_results(DEMO)
    s, t = d["student"]["per_radius"][1]["worst"], d["teacher"]["per_radius"][1]["worst"]
    assert (s["k"], t["k"], s["n"]) == (261, 307, 500)
    gate = "student.worst@0.1 >= 0.95*teacher.worst@0.1"
    assert main(["gate", str(DEMO), "--gate", "student.clean >= 0.65", "--gate", gate, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["gates_passed"] is False and out["exit_code"] == 1 and out["gate_on"] == "lower"
    ok, bad = out["gates"]
    assert ok["passed"] and ok["compared"] == pytest.approx([d["student"]["clean"]["ci_low"], 0.65])
    # no samples.safetensors beside the demo results: the conservative interval arithmetic
    assert bad["method"] == "interval" and not bad["passed"]
    assert bad["compared"] == pytest.approx([s["ci_low"], 0.95 * t["ci_high"]])
    # 0.95 * 0.614 = 0.5833 against 0.522: the point estimates miss by 0.0613
    assert bad["short_by"] == pytest.approx(0.95 * 0.614 - 0.522)
    assert bad["bound_short_by"] == pytest.approx(0.95 * t["ci_high"] - s["ci_low"])
    assert bad["samples_needed"] is None  # the point estimates fail: no sample size decides it
    assert bad["reason"] == ("FAIL: student.worst@0.1 = 0.522 (lower 95% bound 0.477) < 0.95 x teacher.worst@0.1 = 0.583 "
                             "(upper 95% bound 0.624); short by 0.0613")
    assert main(["gate", str(DEMO), "--gate", gate]) == 1
    assert _last_line(capsys.readouterr().out) == f"Verdict: FAIL: {gate} (short by 0.0613)"


def test_recorded_gates_judged_again(capsys):
    """Without --gate the file's own gates are judged again; the demo audit passed both, the before audit
    failed the transfer gate (0.226 < 0.65 x 0.614)."""
    assert main(["gate", str(DEMO), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [g["gate"] for g in out["gates"]] == load_results(DEMO)["config"]["gates"]
    assert main(["gate", str(BEFORE)]) == 1
    assert "Verdict: FAIL: student.worst@0.1 >= 0.65*teacher.worst@0.1 (short by 0.173)" in capsys.readouterr().out


def test_bounds_fail_but_points_hold_says_how_many_samples(capsys):
    """student.clean = 377/500 = 0.754 >= 0.74 on the point estimate, but its lower 95% bound is 0.714."""
    from scipy.stats import beta

    assert main(["gate", str(DEMO), "--gate", "student.clean >= 0.74", "--gate-on", "point"]) == 0
    capsys.readouterr()
    assert main(["gate", str(DEMO), "--gate", "student.clean >= 0.74", "--json"]) == 1
    g = json.loads(capsys.readouterr().out)["gates"][0]
    assert g["short_by"] is None and g["bound_short_by"] == pytest.approx(0.74 - 0.7138133252522826)
    # independent: the smallest n whose Clopper-Pearson lower bound at the observed share reaches 0.74
    n = 500
    while beta.ppf(0.025, 0.754 * n, n - 0.754 * n + 1) < 0.74:
        n += 50
    assert g["samples_needed"] == pytest.approx(n, rel=0.03)
    assert "on the point estimates, but not at 95% confidence" in g["reason"]
    assert f"about {g['samples_needed']} samples would decide it" in g["reason"]


@pytest.mark.parametrize("gate, words", [
    ("student.worst@0.1 >= = 1", "unexpected"),
    ("student.worst@0.2 >= 0.5", "radius 0.2"),  # not 51/255
    ("student.square@0.1 >= 0.5", "audited attack"),
    ("student.certified@0.1 >= 0.5", "certification"),
])
def test_bad_gate_exits_2(gate, words, capsys):
    assert main(["gate", str(DEMO), "--gate", gate]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robkd gate: error:") and words in err[0]


def test_malformed_results_exit_2(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema_version": "1", "teacher": {}')
    d = load_results(DEMO)
    del d["student"]["per_radius"][0]["worst"]
    bad_schema = tmp_path / "bad" / "results.json"
    bad_schema.parent.mkdir()
    bad_schema.write_text(json.dumps(d))
    for path, words in ((broken, "JSON"), (bad_schema, "student.per_radius[0].worst"), (tmp_path / "missing.json", "")):
        assert main(["gate", str(path), "--gate", "student.clean >= 0.5"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0]


def test_default_verdict_enforced_and_write(tmp_path, capsys):
    """The demo student keeps 261/307 = 85% of the teacher's robustness at 0.1: advisory without gates,
    exit 1 when enforced; --write stores the new verdicts in a file the readers accept."""
    assert main(["gate", str(DEMO), "--gate-on", "point", "--gate", "student.clean >= 0.5", "--json"]) == 0
    dv = json.loads(capsys.readouterr().out)["default_verdict"]
    assert dv["expr"] == "student.worst@0.1 >= 0.9*teacher.worst@0.1" and dv["kept"] == pytest.approx(261 / 307)
    assert dv["passed"] is False and dv["enforced"] is False and dv["gate"]["on"] == "point"
    out = tmp_path / "rejudged.json"
    assert main(["gate", str(DEMO), "--enforce-default-verdict", "--write", str(out)]) == 1
    text = capsys.readouterr().out
    assert _last_line(text) == "Verdict: FAIL: student.worst@0.1 >= 0.9*teacher.worst@0.1 (short by 0.0306)"
    written = load_results(out)
    assert written["default_verdict"]["enforced"] is True and written["exit_code"] == 1
    assert written["rejudged"]["command"][:2] == ["robkd", "gate"] and written["command"] == load_results(DEMO)["command"]
    assert written["gates"] == json.loads(json.dumps(written["gates"]))  # plain JSON
    # the committed file itself is left alone
    assert "rejudged" not in load_results(DEMO)


def test_paired_judgement_with_samples_beside(tmp_path, capsys):
    """With samples.safetensors beside the results, a two-metric gate gets the audit's paired bootstrap."""
    import torch
    from safetensors.torch import save_file

    d = load_results(DEMO)
    n = d["data"]["n"]
    student, teacher = torch.zeros(2, n, dtype=torch.bool), torch.zeros(2, n, dtype=torch.bool)
    for i in range(2):  # per-sample outcomes with the recorded counts; the student robust only where the teacher is
        kt, ks = d["teacher"]["per_radius"][i]["worst"]["k"], d["student"]["per_radius"][i]["worst"]["k"]
        teacher[i, :kt] = True
        student[i, :ks] = True
    tensors = {"indices": torch.arange(n), "teacher.robust": teacher, "student.robust": student,
               "teacher.clean_correct": torch.ones(n, dtype=torch.bool), "student.clean_correct": torch.ones(n, dtype=torch.bool)}
    (tmp_path / "results.json").write_text(json.dumps(d))
    save_file(tensors, str(tmp_path / "samples.safetensors"))
    assert main(["gate", str(tmp_path), "--gate", "student.worst@0.1 >= 0.5*teacher.worst@0.1", "--json"]) == 0
    g = json.loads(capsys.readouterr().out)["gates"][0]
    # the student's robust samples are a subset of the teacher's: on a resample with s of the student's 261 and
    # x of the other 44 teacher-robust samples the gate reads s >= 0.5 (s + x), i.e. s >= x: on every resample
    assert g["method"] == "paired-bootstrap" and g["holds_fraction"] == 1.0 and g["passed"]
    # without the per-sample file: the conservative interval rule on the same figures
    (tmp_path / "samples.safetensors").unlink()
    assert main(["gate", str(tmp_path), "--gate", "student.worst@0.1 >= 0.5*teacher.worst@0.1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gates"][0]["method"] == "interval"
