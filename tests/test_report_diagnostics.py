"""The report's diagnostics: per-class robust accuracy, the gallery of lost samples, the one-radius
certified chart, bar value labels and headroom, the before/after colours, the one phrasing of "lost",
and the audit specs bundled with the package."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest

import report_fixtures as F
import report_samples as S

from robkd.report import render
from robkd.report.gallery import GALLERY_MAX, THUMB
from robkd.report.svg import BarGroup, bar_chart

REPO = Path(__file__).resolve().parent.parent


def _table_rows(md: str, heading: str) -> list[list[str]]:
    """The body rows of the first markdown table after ``heading``."""
    lines = md.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| "))
    table = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        table.append(ln)
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in table[2:]]


@pytest.fixture
def main(monkeypatch):  # noqa: ANN001, ANN201
    """The ``robkd`` entry point, with the command table limited to modules that exist in this checkout."""
    import importlib.util

    from robkd.cli import main as cli_main

    present = {k: v for k, v in cli_main.COMMANDS.items() if importlib.util.find_spec(v) is not None}
    monkeypatch.setattr(cli_main, "COMMANDS", present)
    return cli_main.main


# ----------------------------------------------------------------------------- per class, gallery (hand-made)
def test_per_class_and_gallery_from_a_samples_file(tmp_path: Path) -> None:
    d, a = S.with_samples(F.audit_result(), tmp_path / "r")
    paths = render(d, tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    html = (tmp_path / "r" / "report.html").read_text()
    assert "## Robust accuracy per class" in md and 'id="per-class"' in html
    # the per-class table equals a count from the per-sample arrays
    rows = _table_rows(md, "## Robust accuracy per class")
    labels, rt, rs = a["labels"], a["teacher.robust"][-1], a["student.robust"][-1]
    assert len(rows) == len(np.unique(labels))
    for row, c in zip(rows, np.unique(labels)):
        m = labels == c
        n = int(m.sum())
        assert row[1] == str(n)
        assert f"({int((rt & m).sum())}/{n})" in row[4] and f"({int((rs & m).sum())}/{n})" in row[5]
        assert f"({int((a['student.clean_correct'] & m).sum())}/{n})" in row[3]
        assert row[6] == f"{100 * (int((rs & m).sum()) - int((rt & m).sum())) / n:+.1f} pts"
    # the gallery shows exactly the first lost samples (teacher robust, student broken at the largest radius)
    lost = np.flatnonzero(rt & ~rs)
    assert len(lost) == d["transfer"][-1]["lost"]["k"] > GALLERY_MAX
    gal = _table_rows(md, "## Samples the student lost at 0.1")
    assert [int(r[1]) for r in gal] == [int(a["indices"][p]) for p in lost[:GALLERY_MAX]]
    assert f"the first {GALLERY_MAX} of {len(lost)}" in md
    pngs = sorted(p.name for p in paths if p.suffix == ".png")
    assert pngs == sorted(f"report-lost-{k}.png" for k in range(1, GALLERY_MAX + 1))
    assert html.count('<img src="data:image/png;base64,') == GALLERY_MAX
    # the thumbnail: clean | adversarial | perturbation, 28x28 enlarged 3x, the first panel is the clean image
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "r" / "report-lost-1.png").convert("RGB"))
    k = THUMB // 28
    assert img.shape == (28 * k, 3 * 28 * k + 2 * 6, 3)
    clean = np.round(a["teacher.x_adv"][lost[0], 0] * 255).astype(int)
    assert np.abs(img[::k, : 28 * k : k, 0].astype(int) - clean).max() <= 1
    adv = np.round(a["student.x_adv"][lost[0], 0] * 255).astype(int)
    assert np.abs(img[::k, 28 * k + 6 : 2 * 28 * k + 6 : k, 1].astype(int) - adv).max() <= 1
    pert = img[::k, 2 * (28 * k + 6)::k, 2].astype(int)
    delta = a["student.x_adv"][lost[0], 0].astype(np.float64) - a["teacher.x_adv"][lost[0], 0]
    want = np.round((0.5 + delta * 0.5 / np.abs(delta).max()) * 255)  # the largest change spans half the grey range
    assert np.abs(pert - want).max() <= 1 and (pert.min() == 0 or pert.max() == 255)
    # labels and predictions, by class name
    first = gal[0]
    lab = int(a["labels"][lost[0]])
    names = d["data"]["class_names"]
    assert first[2] == f"{lab} {names[lab]}" and first[4] == f"{(lab + 3) % 10} {names[(lab + 3) % 10]}"
    assert first[5].startswith(f"broken at {a['student.adv_radius'][lost[0]]:g}; perturbation ×")


def test_gallery_without_or_with_a_bad_samples_file(tmp_path: Path) -> None:
    d, _ = S.with_samples(F.audit_result(), tmp_path / "good")
    render(d, tmp_path / "none")  # no samples file: the section says so
    md = (tmp_path / "none" / "report.md").read_text()
    assert "No per-sample file (samples.safetensors)" in md and "## Robust accuracy per class" in md
    assert not list((tmp_path / "none").glob("*.png"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "samples.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    render(d, tmp_path / "junk")
    assert "could not be read" in (tmp_path / "junk" / "report.md").read_text()
    render(d, tmp_path / "good")
    assert len(list((tmp_path / "good").glob("report-lost-*.png"))) == GALLERY_MAX
    (tmp_path / "good" / "samples.safetensors").rename(tmp_path / "moved.safetensors")
    render(d, tmp_path / "good")  # the thumbnails of the earlier render do not linger
    assert not list((tmp_path / "good").glob("*.png"))
    (tmp_path / "moved.safetensors").rename(tmp_path / "good" / "samples.safetensors")
    other = copy.deepcopy(d)  # a samples file of another audit: counted lost samples disagree
    other["transfer"][-1]["lost"]["k"] += 1
    render(other, tmp_path / "o", samples=tmp_path / "good" / "samples.safetensors")
    assert "does not belong to these results" in (tmp_path / "o" / "report.md").read_text()


def test_old_results_render_without_the_new_sections(tmp_path: Path) -> None:
    render(F.audit_result(), tmp_path / "a")
    md = (tmp_path / "a" / "report.md").read_text()
    assert "Robust accuracy per class" not in md
    from robkd.report import load_results

    render(load_results(REPO / "reports" / "demo" / "results.json"), tmp_path / "demo")
    assert "Verdict" in (tmp_path / "demo" / "report.html").read_text()


def test_cli_report_reads_the_samples_file_beside_the_results(tmp_path: Path, main) -> None:  # noqa: ANN001
    d, _ = S.with_samples(F.audit_result(), tmp_path / "src")
    import json

    (tmp_path / "src" / "results.json").write_text(json.dumps(d))
    assert main(["report", str(tmp_path / "src" / "results.json"), "--out", str(tmp_path / "dst")]) == 0
    assert (tmp_path / "dst" / "report-lost-1.png").is_file()


# ----------------------------------------------------------------------------- the "lost" phrasing
def test_lost_is_phrased_with_count_and_both_shares(tmp_path: Path) -> None:
    d = F.audit_result()
    render(d, tmp_path)
    md = (tmp_path / "report.md").read_text()
    for tr in d["transfer"]:
        lost = tr["lost"]
        want = (f"{lost['k']} samples ({100 * lost['value']:.1f}% \\[{100 * lost['ci_low']:.1f}, {100 * lost['ci_high']:.1f}\\] "
                f"of all, {100 * lost['of_teacher_robust']:.1f}% of the teacher-robust)")
        assert want in md


# ----------------------------------------------------------------------------- charts
def _rects(svg: str) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in re.findall(r'(x|y|width|height)="([-\d.]+)"', m)}
            for m in re.findall(r'<rect ([^>]*)><title>', svg)]  # bars carry a tooltip; frame and legend do not


def test_one_radius_certified_chart_is_bars(tmp_path: Path) -> None:
    d = F.audit_result(certify=True)
    keep = 1
    d["radii"], d["radii_text"] = d["radii"][keep:keep + 1], d["radii_text"][keep:keep + 1]
    d["config"]["eps"] = d["radii"]
    for role in ("teacher", "student"):
        d[role]["per_radius"] = d[role]["per_radius"][keep:keep + 1]
        d[role]["certification"]["per_radius"] = d[role]["certification"]["per_radius"][keep:keep + 1]
    d["transfer"] = d["transfer"][keep:keep + 1]
    d["gates"] = []
    render(d, tmp_path, formats=("md",))
    svg = (tmp_path / "report-certified-vs-empirical.svg").read_text()
    assert "<polyline" not in svg
    bars = [r for r in _rects(svg) if r.get("height", 0) > 0 and r.get("width", 0) > 10]
    assert len(bars) == 4  # certified and empirical, teacher and student
    labels = re.findall(r'class="bar-value"[^>]*>([^<]+)<', svg)
    want = [f"{100 * d[m]['certification']['per_radius'][0]['certified']['value']:.1f}%" for m in ("teacher", "student")]
    want += [f"{100 * d[m]['per_radius'][0]['worst']['value']:.1f}%" for m in ("teacher", "student")]
    assert sorted(labels) == sorted(want)


def test_bars_have_headroom_and_value_labels() -> None:
    vals = [0.4, 1.7, 0.93]
    svg = bar_chart(["a", "b", "c"], [BarGroup("g", vals)], title="t")
    plot_top = float(re.search(r'<rect x="[\d.]+" y="([\d.]+)" width="[\d.]+" height="[\d.]+" fill="#ffffff" stroke', svg).group(1))
    bars = [r for r in _rects(svg) if r.get("width", 0) > 10]
    assert len(bars) == 3
    tallest = min(r["y"] for r in bars)
    plot_h = max(r["y"] + r["height"] for r in bars) - plot_top
    assert tallest - plot_top >= 0.1 * plot_h  # room above the tallest bar for its label
    labels = re.findall(r'class="bar-value"[^>]*>([^<]+)<', svg)
    assert labels == ["0.4", "1.7", "0.93"]
    ys = [float(m) for m in re.findall(r'class="bar-value" x="[\d.]+" y="([\d.]+)"', svg)]
    assert all(plot_top < y <= r["y"] for y, r in zip(ys, bars))  # each label above its bar, inside the plot
    log_svg = bar_chart(["a", "b"], [BarGroup("g", [0.01, 50.0])], log=True)
    assert re.findall(r'class="bar-value"[^>]*>([^<]+)<', log_svg) == ["0.01", "50"]
    narrow = bar_chart([str(i) for i in range(8)], [BarGroup(f"g{j}", [0.123456] * 8) for j in range(3)])
    assert narrow.count('class="bar-value"') == 24 and "rotate(-90" in narrow


def test_before_and_after_colours_stay_apart_for_colour_blind_readers() -> None:
    from robkd.report.format import BEFORE_COLOR, STUDENT_COLOR, TEACHER_COLOR

    # Machado et al. (2009) full-severity dichromacy matrices on linear RGB; distance in CIELAB
    sims = {"none": np.eye(3),
            "deuteranopia": np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]]),
            "protanopia": np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]]),
            "tritanopia": np.array([[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]])}

    def lab(hex_color: str, m: np.ndarray) -> np.ndarray:
        c = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        lin = np.clip(m @ np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4), 0, 1)
        xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ lin
        f = np.cbrt(np.maximum(xyz / np.array([0.95047, 1.0, 1.08883]), 0.008856))
        return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])

    def worst(a: str, b: str) -> float:
        return min(float(np.linalg.norm(lab(a, m) - lab(b, m))) for m in sims.values())

    assert worst("#E69F00", "#D55E00") < 20  # the former before/after pair: close for dichromats
    assert worst(BEFORE_COLOR, STUDENT_COLOR) > 40
    assert worst(BEFORE_COLOR, TEACHER_COLOR) > 40


# ----------------------------------------------------------------------------- bundled specs
def test_bundled_specs_equal_the_repository_audits_folder() -> None:
    top = {p.name: p.read_bytes() for p in (REPO / "audits").glob("*.toml")}
    packaged = {p.name: p.read_bytes() for p in (REPO / "robkd" / "audits").glob("*.toml")}
    assert top and packaged == top, "robkd/audits/ must be a copy of audits/ (cp audits/*.toml robkd/audits/)"
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "audits/*.toml" in pyproject["tool"]["setuptools"]["package-data"]["robkd"]


def test_spec_by_bundled_name(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from robkd.auditing.config import AuditConfig, bundled_specs
    from robkd.errors import UsageError

    monkeypatch.chdir(tmp_path)  # no audits/ folder here
    assert sorted(bundled_specs()) == sorted(p.stem for p in (REPO / "audits").glob("*.toml"))
    by_path = AuditConfig.from_spec(REPO / "audits" / "demo.toml")
    for name in ("demo", "robkd:demo", "demo.toml"):
        assert AuditConfig.from_spec(name) == by_path
    assert AuditConfig.from_spec("robkd:cifar10-template").data == "cifar10"
    with pytest.raises(UsageError, match=r"audit spec not found: nosuch .*bundled specs.*cifar10-template, demo"):
        AuditConfig.from_spec("nosuch")
    with pytest.raises(UsageError, match="audit spec not found"):
        AuditConfig.from_spec("audits/demo.toml")  # a path is a path: no silent fallback to the bundled copy
    own = tmp_path / "demo"  # an existing file wins over the bundled name
    own.write_text("n = 7\n")
    assert AuditConfig.from_spec("demo").n == 7


# ----------------------------------------------------------------------------- a real (tiny) audit
def test_real_audit_per_class_adv_pred_and_gallery(trained_cnn, trained_mlp, fmnist_test, tmp_path: Path) -> None:
    """Teacher cnn_small, student mlp (both plain, from the session fixtures): the audit's per-class counts
    equal a count over its own samples file, ``adv_pred`` is the student's prediction on its stored
    adversarial example, and the gallery shows the first lost samples with their clean images."""
    import torch
    from safetensors.numpy import load_file

    from robkd.auditing import audit

    out = tmp_path / "audit"
    res = audit(trained_cnn, trained_mlp, data="fashion-mnist-slice", n=96, eps="0.01,0.03", attacks=["pgd-10"],
                sanity_n=0, out_dir=out)
    d = res.to_dict()
    t = load_file(str(out / "samples.safetensors"))
    labels = t["labels"]
    for role in ("teacher", "student"):
        assert d[role]["per_class"] == S.per_class_counts(labels, t[f"{role}.clean_correct"], t[f"{role}.robust"])
        assert sum(d[role]["per_class"]["robust"][-1]) == d[role]["per_radius"][-1]["worst"]["k"]
    broken = np.flatnonzero(np.isfinite(t["student.adv_radius"]))
    assert len(broken) > 0
    with torch.no_grad():
        logits = trained_mlp(torch.from_numpy(t["student.x_adv"][broken]))
    assert np.array_equal(t["student.adv_pred"][broken], logits.argmax(1).numpy())
    assert (t["student.adv_pred"][broken] != labels[broken]).all()  # verified adversarial examples
    never = np.flatnonzero(~np.isfinite(t["student.adv_radius"]))
    assert np.array_equal(t["student.adv_pred"][never], t["student.clean_pred"][never])

    render(d, out)
    md = (out / "report.md").read_text()
    lost = np.flatnonzero(t["teacher.robust"][-1] & ~t["student.robust"][-1])
    assert len(lost) == d["transfer"][-1]["lost"]["k"] > 0
    gal = _table_rows(md, "## Samples the student lost at 0.03")
    assert [int(r[1]) for r in gal] == [int(t["indices"][p]) for p in lost[:GALLERY_MAX]]
    from PIL import Image

    img = np.asarray(Image.open(out / "report-lost-1.png").convert("L")).astype(int)
    k = THUMB // 28
    row = int((fmnist_test.indices == int(t["indices"][lost[0]])).nonzero()[0, 0])  # "indices" are positions in the full split
    clean = fmnist_test.float_x(torch.tensor([row]))[0, 0].numpy()
    assert np.abs(img[::k, : 28 * k : k] - np.round(clean * 255)).max() <= 1  # the first panel is the clean image
    assert "## Robust accuracy per class" in md and len(_table_rows(md, "## Robust accuracy per class")) == len(np.unique(labels))
