"""Reports rendered from a real (tiny) audit: the figures in the report are the audit's figures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from robkd.report import load_results, render


@pytest.fixture(scope="module")
def tiny_student(fmnist_train):
    """A second, smaller non-robust MLP (784-32-10), trained briefly on the real slice."""
    from helpers import train_plain

    from robkd.models import build_model

    m = build_model("robkd:mlp", input_shape=(1, 28, 28), num_classes=10, dataset="fashion-mnist", arch_kwargs={"hidden": [32]})
    return train_plain(m, fmnist_train, epochs=2, seed=3)


@pytest.fixture(scope="module")
def real_audit(trained_mlp, tiny_student, tmp_path_factory):
    from robkd.auditing import audit

    out = tmp_path_factory.mktemp("audit")
    res = audit(trained_mlp, tiny_student, data="fashion-mnist-slice", n=120, eps="1/255,0.02,0.05",
                attacks=["fgsm", "pgd-10"], gates=["student.worst@0.05 >= 0.9*teacher.worst@0.05", "student.clean >= 0.1"],
                llm=True, llm_steps=5, certify="crown", out_dir=out,
                command=["robkd", "audit", "teacher.pt", "student.pt", "--eps", "1/255,0.02,0.05"])
    return res, out


def test_report_from_real_audit(real_audit, tmp_path: Path) -> None:
    res, out = real_audit
    d = res.to_dict()
    paths = render(d, out)
    assert (out / "report.html") in paths and (out / "report.md") in paths
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    # the verdict matches the audit's own gate judgement
    word = "PASS" if res.gates_passed else "FAIL"
    assert f"Verdict: {word}" in html and f"Verdict: {word}" in md
    for g in d["gates"]:
        assert g["gate"].replace(">", "&gt;") in html
    # every worst-case figure of the report is the audit's metric, looked up through its own API
    for role in ("teacher", "student"):
        for r_text in d["radii_text"]:
            iv = res.metric(f"{role}.worst@{r_text}")
            assert f"{100 * iv.point:.1f}% [{100 * iv.lo:.1f}, {100 * iv.hi:.1f}]" in html
        clean = res.metric(f"{role}.clean")
        assert f"{100 * clean.point:.1f}% [{100 * clean.lo:.1f}, {100 * clean.hi:.1f}]" in html
    # the optional sections the audit computed are all there
    for heading in ("Certified vs empirical robustness", "Local linearity and Proposition 2", "Linear regions", "Transfer of robustness"):
        assert heading in html
    viol = d["prop2"]["per_radius"][-1]["summary"]
    assert f"{100 * viol['violation_rate']:.1f}% ({viol['violations']}/{viol['n']})" in html
    assert "robkd audit teacher.pt student.pt --eps 1/255,0.02,0.05" in md
    assert len(re.findall(r"<svg", html)) == 6  # + robust accuracy per class
    # re-rendering from the written file (what `robkd report` does: it reads the samples file beside the
    # results for the gallery of lost samples) gives the same report
    again = tmp_path / "again"
    render(load_results(out / "results.json"), again, samples=out / "samples.safetensors")
    assert (again / "report.html").read_text() == html
    assert json.loads((again / "results.json").read_text()) == d
