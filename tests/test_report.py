"""Reports: Markdown + SVG files and self-contained HTML from results dicts; escaping; schema checks."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

import report_fixtures as F

from robkd.report import ResultsError, load_results, render
from robkd.report.escape import esc_html, esc_md, md_code_block, md_code_span

EVIL = "<script>alert(1)</script>"


class _Tags(HTMLParser):
    """Collects start tags, attributes and text of an HTML document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):  # noqa: ANN001
        self.text.append(data)


def parse_html(text: str) -> _Tags:
    p = _Tags()
    p.feed(text)
    p.close()
    return p


def full_result() -> dict:
    """Every optional section present, plus a sanity flag."""
    d = F.repair_result()
    d["prop2"] = F.audit_result(prop2=True)["prop2"]
    c = F.audit_result(certify=True)
    d["teacher"]["certification"] = c["teacher"]["certification"]
    d["student"]["certification"] = c["student"]["certification"]
    d["sanity"]["flags"] = [{"code": "fgsm-beats-pgd", "message": "FGSM breaks samples PGD missed",
                             "suggestion": "use more PGD steps", "model": "student"}]
    return d


# ----------------------------------------------------------------------------- rendering
def test_audit_report_md_html_and_svgs(tmp_path: Path) -> None:
    d = F.audit_result()
    paths = render(d, tmp_path)
    names = sorted(p.name for p in paths)
    assert {"report.md", "report.html", "results.json"} <= set(names)
    assert all(p.is_file() and p.parent == tmp_path for p in paths)
    assert json.loads((tmp_path / "results.json").read_text()) == d

    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    # verdict: one of the two gates failed in this dict
    assert "Verdict: FAIL" in md and "Verdict: FAIL" in html
    assert "1 of 2 release gates failed" in md
    # every number of the table, formatted independently from the raw counts and intervals
    for role in ("teacher", "student"):
        for row in d[role]["per_radius"]:
            w = row["worst"]
            cell = f"{100 * w['k'] / w['n']:.1f}% [{100 * w['ci_low']:.1f}, {100 * w['ci_high']:.1f}]"
            assert cell.replace("[", "\\[").replace("]", "\\]") in md
            assert cell in html
    ratio = d["transfer"][-1]["ratio"]
    assert f"{ratio['value']:.3f} [{ratio['ci_low']:.3f}, {ratio['ci_high']:.3f}]" in html
    # md links every SVG it wrote, and every SVG is well-formed XML with plot content
    svgs = [p for p in paths if p.suffix == ".svg"]
    assert len(svgs) == 2  # worst case + the attack cascade (two attacks)
    for p in svgs:
        assert f"]({p.name})" in md
        root = ET.fromstring(p.read_text())
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert root.findall(".//{http://www.w3.org/2000/svg}polyline")
    # the command to reproduce, verbatim inside a code block
    assert "robkd audit models/teacher.safetensors models/kd_student.safetensors --eps 0.02,0.05,0.1" in md
    # optional sections absent -> not rendered
    for heading in ("Certified vs empirical", "Local linearity", "Linear regions", "Training", "Before and after"):
        assert heading not in html


def test_html_is_self_contained(tmp_path: Path) -> None:
    render(full_result(), tmp_path, formats=("html",))
    assert not (tmp_path / "report.md").exists()
    assert not list(tmp_path.glob("*.svg"))
    html = (tmp_path / "report.html").read_text()
    doc = parse_html(html)
    tags = [t for t, _ in doc.tags]
    assert "script" not in tags and "link" not in tags and "img" not in tags and "iframe" not in tags
    assert tags.count("svg") >= 7  # worst case, cascade, certification, LLM, Prop 2, 2x training, before/after
    for _, attrs in doc.tags:
        for k, v in attrs.items():
            assert k not in ("src", "href") or not v or v.startswith("#")
            assert not (v or "").lower().startswith(("http:", "https:", "//", "javascript:")) or k == "xmlns"
    assert "url(" not in re.sub(r"url\(#[A-Za-z0-9_-]+\)", "", html)  # only in-document references


def test_all_optional_sections(tmp_path: Path) -> None:
    d = full_result()
    render(d, tmp_path)
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    for heading in ("Certified vs empirical robustness", "Local linearity and Proposition 2", "Linear regions",
                    "Training (repair)", "Before and after repair", "Evaluation sanity checks"):
        assert heading in html
    assert "robkd repair report" in html
    # before/after comes first in a repair report (right after the verdict)
    assert html.index("Before and after repair") < html.index("Robust accuracy")
    # sanity flag: a warning in the verdict box and the flag in the table
    assert "1 evaluation sanity flag raised (fgsm-beats-pgd)" in html
    assert "FGSM breaks samples PGD missed" in md
    # LLM/Prop-2: the caveats and the labelled paper figure, the violation rate
    assert "estimate from below" in html and "dual norm" in html and "paper" in html
    assert "0.5% (2/400)" in html  # violation rate at the largest radius
    # certification undecided band = empirical - certified, computed here from the dict
    row = d["student"]["certification"]["per_radius"][1]
    assert f"{100 * (row['empirical']['value'] - row['certified']['value']):.1f}%" in html
    # training log numbers and the before/after change in points
    assert "kdiga" in html and "50.0%" in html
    b = d["before"]["student"]["per_radius"][2]["worst"]["value"]
    a = d["student"]["per_radius"][2]["worst"]["value"]
    assert f"{100 * (a - b):+.1f} pts" in html
    assert len(list(tmp_path.glob("report-*.svg"))) == 8


def test_minimal_result_renders(tmp_path: Path) -> None:
    """Only the required parts: no radii, no gates, no provenance -> still a valid report."""
    d = {"schema_version": "1", "teacher": {"clean": {"value": 0.9, "k": 9, "n": 10, "ci_low": 0.55, "ci_high": 0.997}},
         "student": {"clean": 0.8}}
    paths = render(d, tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "Verdict: NO GATES" in html and "No radii were audited" in html
    assert "90.0%" in html and "80.0%" in html
    assert "was not recorded" in html  # no command
    assert {p.name for p in paths} == {"results.json", "report.md", "report.html"}


def test_render_is_deterministic_and_rerender_keeps_results(tmp_path: Path) -> None:
    d = full_result()
    render(d, tmp_path / "a")
    render(load_results(tmp_path / "a" / "results.json"), tmp_path / "b")
    for name in ("report.md", "report.html", "report-prop2.svg"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_render_imports_no_torch(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(full_result()))
    code = ("import sys; from robkd.report import load_results, render; "
            f"render(load_results({str(path)!r}), {str(tmp_path / 'o')!r}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert (tmp_path / "o" / "report.html").is_file()


# ----------------------------------------------------------------------------- schema checks
@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d.update(schema_version="999"), "unsupported results schema_version '999'"),
    (lambda d: d.pop("schema_version"), "no 'schema_version'"),
    (lambda d: d.pop("student"), "'student' section"),
])
def test_bad_schema_rejected(tmp_path: Path, mutate, msg) -> None:  # noqa: ANN001
    d = F.audit_result()
    mutate(d)
    with pytest.raises(ResultsError, match=re.escape(msg)):
        render(d, tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_load_results_errors(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="not found"):
        load_results(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ResultsError, match="not valid JSON"):
        load_results(bad)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ResultsError, match="expected a JSON object"):
        load_results(arr)
    good = tmp_path / "dir"
    good.mkdir()
    (good / "results.json").write_text(json.dumps(F.audit_result()))
    assert load_results(good)["schema_version"] == "1"  # a directory holding results.json


def test_unknown_format_rejected(tmp_path: Path) -> None:
    from robkd.errors import UsageError

    with pytest.raises(UsageError, match="pdf"):
        render(F.audit_result(), tmp_path, formats=("md", "pdf"))


# ----------------------------------------------------------------------------- escaping
def evil_result() -> dict:
    d = full_result()
    d["teacher"]["model"]["path"] = f"models/{EVIL}.pt"
    d["student"]["model"]["path"] = f"{EVIL}"
    d["student"]["model"]["meta"]["class_names"] = [EVIL, "a|b", "<img src=x onerror=alert(2)>"]
    d["data"]["class_names"] = [EVIL]
    d["gates"][0]["gate"] = f"student.worst@0.1 >= 0.9 {EVIL}"
    d["gates"][0]["reason"] = EVIL
    d["command"] = ["robkd", "audit", EVIL, "```", "`x`"]
    d["sanity"]["flags"][0]["message"] = EVIL
    d["training"]["records"] = [{**r, EVIL: 0.5} for r in d["training"]["records"]]
    d["config"]["attacks"] = ["fgsm", EVIL]
    d["prop2"]["per_radius"][0]["summary"]["note"] = EVIL
    return d


def test_escaping_html_has_no_live_markup(tmp_path: Path) -> None:
    render(evil_result(), tmp_path)
    html = (tmp_path / "report.html").read_text()
    doc = parse_html(html)
    tags = {t for t, _ in doc.tags}
    assert "script" not in tags and "img" not in tags
    assert not any(k.startswith("on") for _, a in doc.tags for k in a)
    assert "<script" not in html.lower() and "<img" not in html.lower()
    text = "".join(doc.text)
    assert EVIL in text  # shown to the reader as text, in the page and inside the SVG legends
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # the SVG files are XML: they parse only if every label was escaped
    for svg in tmp_path.glob("*.svg"):
        ET.fromstring(svg.read_text())
        assert "<script" not in svg.read_text()


def test_escaping_markdown(tmp_path: Path) -> None:
    render(evil_result(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    outside_code = re.sub(r"(`{3,}).*?\1", "", md, flags=re.S)
    outside_code = re.sub(r"(`+)[^`].*?\1", "", outside_code)
    assert "<script" not in outside_code and "<img" not in outside_code
    assert "&lt;script>alert(1)&lt;/script>" in md
    # the command stays verbatim inside a fence longer than any backtick run in it
    assert "````sh\nrobkd audit '<script>alert(1)</script>' '```' '`x`'\n````" in md
    # table cells escape the pipe so rows keep their column count
    for line in md.splitlines():
        if line.startswith("| ") and "a\\|b" in line:
            assert len(re.findall(r"(?<!\\)\|", line)) == 3  # | key | value |


def test_esc_helpers() -> None:
    assert esc_html('"a" & <b>') == "&quot;a&quot; &amp; &lt;b&gt;"
    assert esc_md("*bold* _x_ [l](u) a|b `c`") == "\\*bold\\* \\_x\\_ \\[l\\](u) a\\|b \\`c\\`"
    assert esc_md("# title") == "\\# title" and esc_md("1. item") == "1\\. item" and esc_md("- x") == "\\- x"
    assert esc_md("a - b. 1.5 (c)") == "a - b. 1.5 (c)"  # no clutter where nothing is special
    assert esc_md("x\ny") == "x y" and esc_md("a & <b>") == "a &amp; &lt;b>"
    assert md_code_block("a ``` b") == "````\na ``` b\n````"
    assert md_code_span("a`b") == "``a`b``" and md_code_span("`x") == "`` `x ``"


def test_training_log_beside_results_is_rendered(tmp_path: Path) -> None:
    """`robkd repair` writes training_log.json (TrainLog.to_dict()) beside results.json."""
    from robkd.cli.report import register  # noqa: F401  (the CLI path is exercised in test_report_cli_svg)

    d = F.audit_result()
    tlog = F.repair_result()["training"]
    (tmp_path / "training_log.json").write_text(json.dumps(tlog))
    render(d, tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "Training (repair)" in html and "5 epoch(s) of kdiga" in html
    assert json.loads((tmp_path / "results.json").read_text()) == d  # results.json itself is untouched
    (tmp_path / "training_log.json").write_text("{broken")
    render(d, tmp_path)
    assert "Training (repair)" not in (tmp_path / "report.html").read_text()


def test_title_names_models_by_file_name_or_by_path_when_those_clash(tmp_path: Path) -> None:
    from robkd.report import build_blocks

    d = F.audit_result()
    d["teacher"]["model"]["path"] = "/long/directory/of/the/teacher/zoo/teacher.safetensors"
    d["student"]["model"]["path"] = "s.pt"
    title, _ = build_blocks(d)
    assert title.endswith("s.pt vs teacher.safetensors")
    d["student"]["model"]["path"] = "/other/teacher.safetensors"  # same file name: show the paths
    title, _ = build_blocks(d)
    assert "/other/teacher.safetensors vs /long/directory/of/the/teacher/zoo/teacher.safetensors" in title
