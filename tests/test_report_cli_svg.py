"""`robkd report` CLI (in-process) and the hand-written SVG plotting module."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import report_fixtures as F

import robkd.cli.main as cli_main
from robkd.report.svg import BarGroup, Series, bar_chart, line_chart, nice_ticks

NS = "{http://www.w3.org/2000/svg}"


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def main(monkeypatch):  # noqa: ANN001, ANN201
    """The real ``robkd`` entry point, with the command table limited to modules that exist in this checkout."""
    import importlib.util

    present = {k: v for k, v in cli_main.COMMANDS.items() if importlib.util.find_spec(v) is not None}
    assert "report" in present
    monkeypatch.setattr(cli_main, "COMMANDS", present)
    return cli_main.main


def _write(tmp_path: Path, obj, name: str = "results.json") -> Path:  # noqa: ANN001
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_cli_report_rerenders(tmp_path: Path, capsys, main) -> None:  # noqa: ANN001
    src = _write(tmp_path, F.audit_result(certify=True))
    out = tmp_path / "out"
    assert main(["report", str(src), "--format", "md,html", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(out / "report.html") in printed and str(out / "report.md") in printed
    assert "Verdict: FAIL" in (out / "report.html").read_text()
    assert json.loads((out / "results.json").read_text()) == json.loads(src.read_text())
    # default output directory: beside results.json; html only
    assert main(["report", str(src), "--format", "html"]) == 0
    assert (tmp_path / "report.html").is_file() and not (tmp_path / "report.md").exists()


def test_cli_report_in_place_leaves_a_repair_results_file_untouched(tmp_path: Path, main) -> None:  # noqa: ANN001
    """A repair writes training_log.json beside results.json: re-rendering in place shows it and does not
    rewrite results.json with the log merged in; rendering elsewhere carries the log along."""
    src = _write(tmp_path, F.audit_result())
    (tmp_path / "training_log.json").write_text(json.dumps(F.repair_result()["training"]))
    before = src.read_bytes()
    assert main(["report", str(src), "--format", "html"]) == 0
    assert src.read_bytes() == before
    assert "Training (repair)" in (tmp_path / "report.html").read_text()
    out = tmp_path / "elsewhere"
    assert main(["report", str(src), "--format", "html", "--out", str(out)]) == 0
    assert "Training (repair)" in (out / "report.html").read_text()
    assert json.loads((out / "results.json").read_text())["training"] == F.repair_result()["training"]


@pytest.mark.parametrize("content, fmt, msg", [
    (None, "md,html", "results file not found"),
    ("{not json", "md,html", "is not valid JSON"),
    ({**F.audit_result(), "schema_version": "0.9"}, "md,html", "unsupported results schema_version '0.9'"),
    (F.audit_result(), "md,pdf", "unknown --format pdf"),
    (F.audit_result(), ",", "empty --format"),
])
def test_cli_report_bad_input_exits_2(tmp_path: Path, capsys, main, content, fmt, msg) -> None:  # noqa: ANN001
    path = tmp_path / "results.json" if content is None else _write(tmp_path, content)
    code = main(["report", str(path), "--format", fmt, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert msg in err and err.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "o" / "report.html").exists()


def test_cli_module_imports_only_stdlib() -> None:
    code = ("import sys; import robkd.cli.report; "
            "print(sorted(m for m in ('torch', 'pandas', 'numpy', 'robkd.report') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- SVG module
def test_nice_ticks() -> None:
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.0, 0.1) == [0.0, 0.02, 0.04, 0.06, 0.08, 0.1]
    t = nice_ticks(-3.7, 12.2)
    assert t[0] >= -3.7 and t[-1] <= 12.2 and len(t) >= 3
    steps = {round(b - a, 9) for a, b in zip(t, t[1:])}
    assert len(steps) == 1 and steps.pop() in (2.5, 5.0, 2.0)
    assert nice_ticks(5.0, 5.0)  # degenerate range still gives ticks
    with pytest.raises(ValueError):
        nice_ticks(0.0, float("inf"))


def _points(attr: str) -> list[tuple[float, float]]:
    return [tuple(float(v) for v in p.split(",")) for p in attr.split()]  # type: ignore[misc]


def test_line_chart_geometry() -> None:
    """Markers sit on a linear map of the data; the band polygon encloses its line at every x."""
    xs = [0.0, 0.1, 0.2, 0.4]
    ys = [0.9, 0.7, None, 0.2]
    lo = [0.85, 0.6, None, 0.1]
    hi = [0.95, 0.8, None, 0.3]
    svg = line_chart([Series("m", xs, ys, lo, hi)], title="t", ylim=(0.0, 1.0))
    root = ET.fromstring(svg)
    circles = root.findall(f".//{NS}circle")
    pts = [(float(c.get("cx")), float(c.get("cy"))) for c in circles]
    assert len(pts) == 3  # the None point is a gap
    data = [(x, y) for x, y in zip(xs, ys) if y is not None]
    # px = a + b*x and py = c - d*y: fit from two points, check the third
    (x0, y0), (x1, y1) = data[0], data[1]
    (p0, q0), (p1, q1) = pts[0], pts[1]
    bx, by = (p1 - p0) / (x1 - x0), (q1 - q0) / (y1 - y0)
    assert bx > 0 and by < 0  # higher accuracy is drawn higher up
    assert pts[2][0] == pytest.approx(p0 + bx * (data[2][0] - x0), abs=0.05)
    assert pts[2][1] == pytest.approx(q0 + by * (data[2][1] - y0), abs=0.05)
    # the gap splits the line and the band into two runs; a single-point run has no polyline
    assert len(root.findall(f".//{NS}polyline")) == 1
    band = root.findall(f".//{NS}polygon")
    assert len(band) == 1
    poly = _points(band[0].get("points"))
    top, bottom = poly[: len(poly) // 2], poly[len(poly) // 2:][::-1]
    for (px, py), (tx, ty), (bx_, byy) in zip(pts[:2], top, bottom):
        assert px == pytest.approx(tx) == pytest.approx(bx_)
        assert ty <= py <= byy


def test_bar_chart_heights_proportional() -> None:
    svg = bar_chart(["a", "b"], [BarGroup("g", [1.0, 3.0], err=[0.5, None]), BarGroup("h", [2.0, None])], title="x")
    root = ET.fromstring(svg)
    bars = [r for r in root.findall(f".//{NS}rect") if r.find(f"{NS}title") is not None]
    h = [float(r.get("height")) for r in bars]
    assert len(h) == 3  # the missing value draws no bar
    assert h[1] / h[0] == pytest.approx(3.0, rel=1e-3) and h[2] / h[0] == pytest.approx(2.0, rel=1e-3)
    assert len(root.findall(f".//{NS}line")) >= 3  # error whisker with two caps
    log_svg = bar_chart(["a"], [BarGroup("g", [0.01]), BarGroup("h", [10.0])], log=True)
    lh = [float(r.get("height")) for r in ET.fromstring(log_svg).findall(f".//{NS}rect") if r.find(f"{NS}title") is not None]
    assert lh[0] > 0 and lh[1] > lh[0]


def test_svg_text_is_escaped() -> None:
    evil = "<script>alert(1)</script> & \"q\""
    svg = line_chart([Series(evil, [0, 1], [0.1, 0.2])], title=evil, xlabel=evil, ylabel=evil,
                     xticks=[(0, evil), (1, "1")])
    root = ET.fromstring(svg)  # well-formed XML
    assert not root.findall(f".//{NS}script") and "<script" not in svg
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert texts.count(evil) >= 4  # title, x label, y label, tick, legend
    assert re.search(r"<title>&lt;script&gt;", svg)


def test_svg_stays_well_formed_with_control_characters() -> None:
    """A model path with an escape or NUL character (XML forbids them) still gives a parseable SVG."""
    name = "models/\x1b[31mred\x00.pt"
    svg = line_chart([Series(name, [0, 1], [0.1, 0.2])], title=name, xlabel="r", ylabel="acc")
    root = ET.fromstring(svg)
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert "models/\ufffd[31mred\ufffd.pt" in texts
