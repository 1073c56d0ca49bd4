"""The attack self-test and the common corruptions inside an audit (issue 17, parts 2 and 3): results blocks,
sanity flags, gate metrics, CLI/config settings, the report sections; old results render without them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import robkd
from robkd.auditing import AuditConfig
from robkd.auditing.gates import GateError
from robkd.errors import UsageError
from helpers import Quantised

ZOO = Path(__file__).resolve().parents[1] / "robkd" / "zoo"
FAST = dict(data="fashion-mnist-slice", n=60, eps=[0.05, 0.1], attacks=["pgd-5"], batch_size=60, sanity_n=0)
CORR = ["gaussian_noise", "contrast"]


@pytest.fixture(scope="module")
def pair():
    from robkd.models import load_model

    return load_model(ZOO / "teacher.safetensors"), load_model(ZOO / "kd_student.safetensors")


@pytest.fixture(scope="module")
def audited(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("a")
    res = robkd.audit(*pair, self_test=True, self_test_n=10, corruptions=CORR, severities=[1, 3], out_dir=out,
                      gates=["student.corruption@3 >= 0.5*teacher.corruption@3", "student.corruption >= 0.99"], **FAST)
    return res, out


def test_corruption_block_matches_an_independent_count(pair, audited):
    from robkd.analysis.corruptions import corruption_accuracy
    from robkd.data import eval_subset, load_dataset

    res, _ = audited
    d = res.to_dict()
    sub = eval_subset(load_dataset("fashion-mnist-slice", "test"), 60, 0)
    x, y = sub.float_x(), sub.y
    for role, model in zip(("teacher", "student"), pair):
        ref = corruption_accuracy(model, x, y, CORR, [1, 3], seed=0, ids=sub.indices)
        rec = d[role]["corruption"]
        assert rec["corruptions"] == CORR and rec["severities"] == [1, 3]
        for c in CORR:
            for s in (1, 3):
                assert rec["per_corruption"][c]["per_severity"][str(s)]["k"] == ref.correct[c][s]
        assert rec["per_severity"]["3"]["value"] == pytest.approx(ref.severity_accuracy(3))
        assert rec["mean"]["value"] == pytest.approx(ref.mean_accuracy)
        lo, hi = rec["mean"]["ci_low"], rec["mean"]["ci_high"]
        assert 0.0 <= lo <= rec["mean"]["value"] <= hi <= 1.0
        assert res.tensors[f"{role}.corruption_correct"].shape == (2, 2, 60)
    ratio = d["corruption_transfer"]["per_severity"]["3"]
    assert ratio["ratio"] == pytest.approx(ratio["student"] / ratio["teacher"])
    # gates: the paired bootstrap for the comparison, the interval for the single metric (which fails)
    g1, g2 = res.to_dict()["gates"]
    assert g1["method"] == "paired-bootstrap" and g1["passed"]
    assert g2["method"] == "interval" and not g2["passed"]
    assert res.metric("student.corruption@3").point == pytest.approx(d["student"]["corruption"]["per_severity"]["3"]["value"])


def test_self_test_block_and_report(audited):
    res, out = audited
    d = res.to_dict()
    for role in ("teacher", "student"):
        st = d[role]["self_test"]
        assert st["status"] == "ok" and st["eps"] == 0.1 and st["n"] == 10
        assert st["attacks"]["pgd-5"]["rate"] >= 0.9 and not st["flagged"]
    assert not [f for f in d["sanity"]["flags"] if f["code"] == "attack-self-test-failed"]
    from robkd.report import render

    render(d, out, formats=["md"])
    text = (out / "report.md").read_text()
    assert "Attack self-test" in text and "Common corruptions" in text
    assert (out / "report-corruptions-severity.svg").is_file() and (out / "report-corruptions-mean.svg").is_file()
    # results without the new blocks (older files) render without the sections, and still validate
    from robkd.report import build_blocks
    from robkd.report.schema.validation import validate_results

    old = copy.deepcopy(d)
    for role in ("teacher", "student"):
        del old[role]["self_test"], old[role]["corruption"]
    del old["corruption_transfer"]
    validate_results(old)
    _, blocks = build_blocks(old)
    assert not [b for b in blocks if getattr(b, "text", "") in ("Attack self-test", "Common corruptions")]
    bad = copy.deepcopy(d)
    bad["student"]["corruption"]["per_corruption"]["contrast"]["per_severity"]["3"]["k"] = 99
    with pytest.raises(Exception, match="exceeds"):
        validate_results(bad)


def test_masked_model_fails_the_self_test_and_a_head_without_linear_is_not_applicable(pair):
    teacher, _ = pair
    masked = Quantised(copy.deepcopy(teacher), levels=255).eval()
    res = robkd.audit(teacher, masked, self_test=True, self_test_n=10, strict=True, **{**FAST, "eps": [0.1]})
    d = res.to_dict()
    assert d["student"]["self_test"]["attacks"]["pgd-5"]["rate"] < 0.9
    flags = [f for f in d["sanity"]["flags"] if f["code"] == "attack-self-test-failed"]
    assert [f["model"] for f in flags] == ["student"] and res.exit_code == 3
    torch.manual_seed(0)
    conv_head = nn.Sequential(nn.Conv2d(1, 10, 28), nn.Flatten())  # logits from a convolution: no nn.Linear
    res = robkd.audit(teacher, conv_head, self_test=True, self_test_n=5, **{**FAST, "eps": [0.1], "n": 20})
    st = res.to_dict()["student"]["self_test"]
    assert st["status"] == "not_applicable" and "Linear" in st["reason"]


def test_settings_are_checked_before_anything_runs(pair, tmp_path):
    teacher, student = pair
    with pytest.raises(GateError, match="--corruptions"):
        robkd.audit(teacher, student, gates=["student.corruption@3 >= 0.5"], out_dir=tmp_path / "o", **FAST)
    with pytest.raises(GateError, match="severity 3"):
        robkd.audit(teacher, student, corruptions=["fog"], severities=[1], gates=["student.corruption@3 >= 0.5"], **FAST)
    with pytest.raises(UsageError, match="unknown corruption"):
        robkd.audit(teacher, student, corruptions=["rain"], **FAST)
    assert not (tmp_path / "o").exists()
    for bad in ({"severities": [6]}, {"severities": [3, 3]}, {"corruptions": ["all", "fog"]}, {"self_test_n": 0}):
        with pytest.raises(UsageError):
            AuditConfig.from_spec(None, **bad)
    assert AuditConfig.from_spec(None, corruptions=True).corruptions == ["all"]
    assert AuditConfig.from_spec(None, corruptions="Gaussian-Noise,fog", severities="3").severities == [3]


def test_cli_flags():
    import argparse

    from robkd.cli import audit as cli_audit

    parser = argparse.ArgumentParser()
    cli_audit.register(parser.add_subparsers())
    args = parser.parse_args(["audit", "t.pt", "s.pt", "--corruptions", "--self-test", "--severities", "1,3"])
    over = cli_audit._overrides(args)
    assert over["corruptions"] == "all" and over["self_test"] is True and over["severities"] == "1,3"
    cfg = AuditConfig.from_spec(None, **over)
    assert cfg.corruptions == ["all"] and cfg.severities == [1, 3] and cfg.self_test
    args = parser.parse_args(["audit", "t.pt", "s.pt", "--corruptions", "fog,contrast"])
    assert AuditConfig.from_spec(None, **cli_audit._overrides(args)).corruptions == ["fog", "contrast"]
