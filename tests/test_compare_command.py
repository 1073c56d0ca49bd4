"""``robkd compare A B``: two audits side by side from the committed results files, no model loaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from robkd.auditing.compare import compare, mcnemar_p, newcombe, two_proportion_p
from robkd.cli.main import main
from robkd.report.schema import load_results

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "reports" / "demo" / "results.json"
BEFORE = ROOT / "reports" / "demo" / "before" / "results.json"


def _rows(out: dict) -> dict:
    return {(r["model"], r["metric"], r["radius_text"]): r for r in out["rows"]}


def test_a_file_against_itself_shows_no_difference(capsys):
    assert main(["compare", str(DEMO), str(DEMO), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["same_samples"] is True and out["paired"] is False  # no samples.safetensors committed
    assert len(out["rows"]) == 2 * (1 + 2)  # clean + two radii, per model
    for r in out["rows"]:
        assert r["difference"]["value"] == 0 and r["p_value"] == 1.0 and r["significant"] is False
        assert r["difference"]["ci_low"] < 0 < r["difference"]["ci_high"]
        assert r["a"] == r["b"]
    assert out["only_in_a"] == [] and out["only_in_b"] == []


def test_before_and_after_the_repair(capsys, monkeypatch):
    assert main(["compare", str(BEFORE), str(DEMO), "--json"]) == 0
    rows = _rows(json.loads(capsys.readouterr().out))
    # the teacher did not change
    assert rows[("teacher", "worst", "0.1")]["difference"]["value"] == 0
    assert not rows[("teacher", "worst", "0.1")]["significant"]
    # the student's worst case at 0.1: 113/500 before, 261/500 after; pooled z-test by hand
    r = rows[("student", "worst", "0.1")]
    assert (r["a"]["k"], r["b"]["k"], r["a"]["n"]) == (113, 261, 500)
    pooled = (113 + 261) / 1000
    z = (261 - 113) / 500 / math.sqrt(pooled * (1 - pooled) * 2 / 500)
    assert r["test"] == "two-proportion-z" and r["p_value"] == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-6)
    assert r["significant"] is True and r["difference"]["value"] == pytest.approx((261 - 113) / 500)
    assert 0 < r["difference"]["ci_low"] < 0.296 < r["difference"]["ci_high"]
    # the table (wide enough not to wrap)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["compare", str(BEFORE), str(DEMO)]) == 0
    text = capsys.readouterr().out
    assert "+29.6 pts" in text and "worst @ 0.1" in text


def test_newcombe_and_tests_against_published_and_hand_values():
    # Newcombe (1998), Stat Med 17:873, example (a): 56/70 - 48/80, hybrid score interval (method 10)
    lo, hi = newcombe(48, 80, 56, 70)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    # exact McNemar: 10 discordant samples all one way: p = 2 * 0.5**10
    assert mcnemar_p(0, 10) == pytest.approx(2 * 0.5 ** 10) and mcnemar_p(7, 7) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert two_proportion_p(0, 10, 0, 20) == 1.0
    # phi = 0 reduces the paired interval to the unpaired one; a positive correlation narrows it
    assert newcombe(30, 100, 40, 100, 0.0) == newcombe(30, 100, 40, 100)
    lo_p, hi_p = newcombe(30, 100, 40, 100, 0.6)
    assert lo_p > newcombe(30, 100, 40, 100)[0] and hi_p < newcombe(30, 100, 40, 100)[1]


def test_paired_comparison_with_per_sample_outcomes():
    """Same samples and both per-sample files at hand: exact McNemar on the discordant samples."""
    import torch

    d = load_results(DEMO)
    n = d["data"]["n"]

    def tensors(student_robust: int, clean_flip: int) -> dict:
        robust = torch.zeros(2, n, dtype=torch.bool)
        robust[:, :student_robust] = True
        clean = torch.ones(n, dtype=torch.bool)
        clean[:clean_flip] = False
        return {"indices": torch.arange(n), "student.robust": robust, "teacher.robust": robust.clone(),
                "student.clean_correct": clean, "teacher.clean_correct": clean.clone()}

    a, b = tensors(100, 0), tensors(110, 0)  # B robust on 10 more samples, the same 100 as A besides
    out = compare(d, d, a, b)
    assert out["paired"] is True
    r = _rows(out)[("student", "worst", "0.1")]
    assert r["test"] == "mcnemar-exact" and (r["only_a"], r["only_b"]) == (0, 10)
    assert r["p_value"] == pytest.approx(2 * 0.5 ** 10) and r["significant"] is True
    # the figures shown are the recorded ones; the test is on the per-sample outcomes
    assert r["a"]["k"] == 261
    # different sample indices: no pairing
    b["indices"] = torch.arange(n) + 1
    assert compare(d, d, a, b)["paired"] is False


def test_radii_audited_by_one_only_are_listed(tmp_path):
    d = load_results(DEMO)
    e = json.loads(json.dumps(d))
    e["radii"][0] = 0.06
    e["radii_text"][0] = "0.06"
    out = compare(d, e)
    assert out["only_in_a"] == ["0.05"] and out["only_in_b"] == ["0.06"]
    assert {r["radius_text"] for r in out["rows"]} == {None, "0.1"}
    e["data"]["indices_sha256"] = "0" * 64
    assert "different samples" in compare(d, e)["notes"][0]


def test_bad_files_exit_2(tmp_path, capsys):
    broken = tmp_path / "results.json"
    broken.write_text("[1, 2")
    for args in ((str(broken), str(DEMO)), (str(DEMO), str(tmp_path / "nothing.json"))):
        assert main(["compare", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("robkd compare: error:")
