"""The HTML report in a real headless browser (Debian's chromium): no console errors, verdict and
plots rendered and visible; a screenshot is kept in test-artifacts/ (git-ignored).

Skipped only where no chromium is installed (``./dev test`` installs it with apt where it can).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import report_fixtures as F
import report_samples as S

from robkd.report import render

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
EVIL = "<script>alert(1)</script>"


def _chromium() -> str | None:
    for cand in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")


def _run(url: str, profile: Path, *extra: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Chromium headless, offline-only flags, its own profile; console messages go to stderr."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-extensions", f"--user-data-dir={profile}",
            "--enable-logging=stderr", "--v=0", *extra, url]
    env = {**os.environ, "HOME": str(profile)}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def _console(stderr: str) -> list[str]:
    """Lines chromium logs for page console messages (errors, CSP violations, failed loads)."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


def _report_dict() -> dict:
    d = F.audit_result(certify=True, prop2=True, teacher=f"{EVIL}.pt")
    d["sanity"]["flags"] = [{"code": "pgd-not-converged", "message": f"loss still rising {EVIL}",
                             "suggestion": "more steps", "model": "student"}]
    return d


@needs_chromium
def test_report_in_headless_chromium(tmp_path: Path) -> None:
    out = tmp_path / "report"
    d, _ = S.with_samples(_report_dict(), out)  # per-class counts and a samples file: the diagnostics sections
    render(d, out, formats=("html",))
    url = (out / "report.html").as_uri()
    profile = tmp_path / "profile"

    # negative control: the console scan does see errors (so a clean scan below means something)
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.error('boom'); nope();</script></body></html>")
    ctrl = _run(bad.as_uri(), profile, "--dump-dom")
    assert any("nope" in ln or "boom" in ln for ln in _console(ctrl.stderr)), ctrl.stderr[-2000:]

    # 1. the rendered DOM: verdict and inline SVG plots present, no console message, no live script
    res = _run(url, profile, "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert "Verdict: FAIL" in dom
    assert dom.count("<svg") >= 6  # worst case, cascade, per class, certification, LLM, Prop 2
    assert 'id="per-class"' in dom and 'id="lost-samples"' in dom
    assert dom.count('<img src="data:image/png;base64,') == 8  # the lost-sample gallery (allowed by the page's CSP)
    assert "of all" in dom and "of the teacher-robust" in dom  # the one phrasing of lost samples
    assert "<script" not in dom.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # the hostile name is shown as text
    assert _console(res.stderr) == [], _console(res.stderr)

    # 2. a screenshot: the verdict box (red) at the top and the plot bands/lines (blue, orange) below it
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-screenshot.png"
    shot.unlink(missing_ok=True)
    res = _run(url, profile, f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert _console(res.stderr) == [], _console(res.stderr)
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert img.shape == (2000, 1200, 3)

    def count(box: tuple[int, int, int, int], rgb: tuple[int, int, int], tol: int = 12) -> int:
        x0, y0, x1, y1 = box
        region = img[y0:y1, x0:x1]
        return int((np.abs(region - np.array(rgb)) <= tol).all(axis=-1).sum())

    verdict_red = count((0, 0, 1200, 600), (0xC0, 0x39, 0x2B))  # FAIL border and word
    teacher_blue = count((0, 500, 1200, 2000), (0x00, 0x72, 0xB2))  # teacher curve
    student_orange = count((0, 500, 1200, 2000), (0xD5, 0x5E, 0x00))  # student curve
    assert verdict_red > 2000, verdict_red
    assert teacher_blue > 500 and student_orange > 500, (teacher_blue, student_orange)
