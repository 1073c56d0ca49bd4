"""Results files and reports under hostile input (issue 12, classes 3 and 5).

* the one guarded reader of results.json (``robkd report``, ``AuditResult.load``): deep nesting,
  non-UTF-8 bytes, NaN/Infinity, non-object top levels, huge files, FIFOs, directories;
* schema validation before rendering: a file that breaks the schema is refused with one line naming
  the first offending key path;
* output paths: a file, a path under a file, an unwritable directory, a write error midway;
* user strings with control, bidi and other invisible characters never reach report.md/report.html raw;
* every committed results file still loads, and its committed report re-renders byte-identical.

Every bad case goes through the real CLI (``tests/badinput.py``): exit 2, at most two stderr lines,
no traceback, nothing new on disk. All files are built by the tests themselves.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

import report_fixtures as F
from badinput import expect_failure, run_cli, snapshot

from robkd.report import ResultsError, load_results
from robkd.utils.io import MAX_JSON_BYTES, MAX_JSON_DEPTH

REPO = Path(__file__).resolve().parent.parent


def _write(path: Path, content: Any) -> Path:
    """``content`` as the file: bytes verbatim, str as UTF-8, anything else as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content), encoding="utf-8")
    return path


def _fail_report(tmp_path: Path, capsys, results: Path, *, contains: str | tuple[str, ...] = (), out: Path | None = None,
                 extra: tuple[str, ...] = ()) -> str:
    """``robkd report RESULTS --out OUT`` must fail with exit 2, one line, and leave nothing behind."""
    out = tmp_path / "out" if out is None else out
    res = expect_failure(["report", str(results), "--out", str(out), *extra], capsys, code=2, watch=[tmp_path],
                         contains=contains)
    return res.err


# ----------------------------------------------------------------------------- the guarded reader
def _deep_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def _deep_object(depth: int) -> str:
    return '{"schema_version": "1", "config": ' + '{"a": ' * depth + "1" + "}" * depth + "}"


READER_CASES: dict[str, tuple[Any, str]] = {
    "nested-100000-arrays": (_deep_array(100_000), "nested too deeply"),
    "nested-100000-objects": (_deep_object(100_000), "nested too deeply"),
    "nested-above-limit": (_deep_array(MAX_JSON_DEPTH + 1), "nested too deeply"),
    "latin-1-bytes": ('{"schema_version": "1", "command": ["caf\u00e9"]}'.encode("latin-1"), "not UTF-8"),
    "utf-16": ('{"schema_version": "1"}'.encode("utf-16"), "not UTF-8"),
    "binary-garbage": (bytes(range(256)) * 4, "not UTF-8"),
    "nan-token": ('{"schema_version": "1", "teacher": {"clean": {"value": NaN}}}', "NaN"),
    "infinity-token": ('{"schema_version": "1", "radii": [Infinity]}', "Infinity"),
    "minus-infinity-token": ('{"schema_version": "1", "radii": [-Infinity]}', "-Infinity"),
    "float-overflow": ('{"schema_version": "1", "radii": [1e999]}', "out of the float range"),
    "int-with-5000-digits": ('{"schema_version": "1", "radii": [' + "9" * 5000 + "]}", "not valid JSON"),
    "top-level-array": ("[1, 2]", "expected a JSON object"),
    "top-level-string": ('"results"', "expected a JSON object"),
    "top-level-null": ("null", "expected a JSON object"),
    "empty-file": ("", "not valid JSON"),
    "truncated": (json.dumps(F.audit_result())[:500], "not valid JSON"),
    "trailing-garbage": (json.dumps(F.audit_result()) + " x", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(READER_CASES))
def test_reader_refuses_malformed_files(tmp_path: Path, capsys, case: str) -> None:  # noqa: ANN001
    content, message = READER_CASES[case]
    results = _write(tmp_path / "results.json", content)
    _fail_report(tmp_path, capsys, results, contains=message)


def test_reader_refuses_a_huge_file_without_reading_it(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    results = tmp_path / "results.json"
    with open(results, "wb") as fh:  # sparse: no disk used
        fh.truncate(MAX_JSON_BYTES + 1)
    _fail_report(tmp_path, capsys, results, contains="too large")


def test_reader_refuses_missing_paths_directories_and_fifos(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    _fail_report(tmp_path, capsys, tmp_path / "nope.json", contains="not found")
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    _fail_report(tmp_path, capsys, empty, contains="not found")  # a directory without results.json
    holder = tmp_path / "holder"
    (holder / "results.json").mkdir(parents=True)  # results.json is itself a directory
    _fail_report(tmp_path, capsys, holder, contains="is a directory")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # reading it would block forever
    _fail_report(tmp_path, capsys, fifo, contains="not a regular file")
    plain = _write(tmp_path / "plain.txt", "x")
    _fail_report(tmp_path, capsys, plain / "results.json", contains="results file")  # under a regular file


def test_audit_result_load_uses_the_same_reader(tmp_path: Path) -> None:
    from robkd.auditing import AuditResult
    from robkd.errors import UsageError

    for name, content in (("deep", _deep_array(100_000)), ("nan", '{"schema_version": "1", "x": NaN}'),
                          ("schema", {**F.audit_result(), "radii": ["0.1", "0.2", "0.3"]})):
        d = tmp_path / name
        _write(d / "results.json", content)
        with pytest.raises(ResultsError) as info:
            AuditResult.load(d)
        assert isinstance(info.value, UsageError) and "\n" not in str(info.value)
    good = tmp_path / "good"
    _write(good / "results.json", F.audit_result())
    assert AuditResult.load(good).radii == F.RADII
    (good / "samples.safetensors").write_bytes(b"\xff" * 64)  # corrupt tensors: one line, not a crash
    with pytest.raises(ResultsError, match="samples.safetensors"):
        AuditResult.load(good)


# ----------------------------------------------------------------------------- schema validation
def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation setting the key path ``a.b[0].c`` (``value is DELETE`` removes it)."""

    def mutate(d: dict) -> None:
        keys: list[Any] = []
        for part in path.split("."):
            name, _, rest = part.partition("[")
            keys.append(name)
            keys += [int(i) for i in rest.rstrip("]").split("][")] if rest else []
        node = d
        for k in keys[:-1]:
            node = node[k]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return mutate


DELETE = object()

SCHEMA_CASES: dict[str, tuple[Callable[[dict], None], str]] = {
    "no-radii": (_set("radii", DELETE), "radii"),
    "radii-as-strings": (_set("radii", ["0.02", "0.05", "0.1"]), "radii[0]"),
    "radii-empty": (_set("radii", []), "radii"),
    "radii-not-ascending": (_set("radii", [0.05, 0.02, 0.1]), "radii[1]"),
    "radii-negative": (_set("radii", [-0.02, 0.05, 0.1]), "radii[0]"),
    "linf-radius-above-one": (_set("radii", [0.02, 0.05, 9.0]), "radii[2]"),
    "radii-text-length": (_set("radii_text", ["0.02"]), "radii_text"),
    "schema-version-2": (_set("schema_version", "2"), "schema_version"),
    "schema-version-int": (_set("schema_version", 1), "schema_version"),
    "no-schema-version": (_set("schema_version", DELETE), "schema_version"),
    "unknown-kind": (_set("kind", "robkd-bench"), "kind"),
    "unknown-norm": (_set("norm", "Lmax"), "norm"),
    "command-is-a-string": (_set("command", "robkd audit"), "command"),
    "command-item-number": (_set("command", ["robkd", 3]), "command[1]"),
    "config-is-a-list": (_set("config", []), "config"),
    "attacks-missing": (_set("attacks", DELETE), "attacks"),
    "teacher-is-a-list": (_set("teacher", []), "teacher"),
    "clean-missing": (_set("student.clean", DELETE), "student.clean"),
    "clean-above-one": (_set("teacher.clean.value", 1.5), "teacher.clean.value"),
    "clean-negative": (_set("teacher.clean.value", -0.1), "teacher.clean.value"),
    "clean-as-string": (_set("student.clean.value", "0.9"), "student.clean.value"),
    "clean-null": (_set("student.clean.value", None), "student.clean.value"),
    "clean-bool": (_set("student.clean.value", True), "student.clean.value"),
    "ci-above-one": (_set("teacher.clean.ci_high", 1.01), "teacher.clean.ci_high"),
    "k-exceeds-n": (_set("teacher.clean.k", 401), "teacher.clean.k"),
    "k-float": (_set("teacher.clean.k", 3.5), "teacher.clean.k"),
    "per-radius-short": (_set("student.per_radius", []), "student.per_radius"),
    "worst-missing": (_set("teacher.per_radius[1].worst", DELETE), "teacher.per_radius[1].worst"),
    "worst-above-one": (_set("student.per_radius[2].worst.value", 3), "student.per_radius[2].worst.value"),
    "after-attack-bad": (_set("student.per_radius[0].after_attack.fgsm.value", "x"),
                         "student.per_radius[0].after_attack.fgsm.value"),
    "certification-rows": (_set("teacher.certification", {"status": "ok", "method": "crown", "per_radius": []}),
                           "teacher.certification.per_radius"),
    "transfer-missing": (_set("transfer", DELETE), "transfer"),
    "transfer-lost-above-one": (_set("transfer[0].lost.value", 2.0), "transfer[0].lost.value"),
    "ratio-negative": (_set("transfer[1].ratio.value", -1.0), "transfer[1].ratio.value"),
    "gates-not-a-list": (_set("gates", {"gate": "x"}), "gates"),
    "gate-passed-string": (_set("gates[0].passed", "yes"), "gates[0].passed"),
    "sanity-flags-not-a-list": (_set("sanity.flags", "none"), "sanity.flags"),
    "prop2-rows-not-a-list": (_set("prop2", {"per_radius": 3}), "prop2.per_radius"),
    "training-is-a-number": (_set("training", 5), "training"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_report_refuses_files_that_break_the_schema(tmp_path: Path, capsys, case: str) -> None:  # noqa: ANN001
    mutate, key_path = SCHEMA_CASES[case]
    d = F.audit_result()
    mutate(d)
    results = _write(tmp_path / "results.json", d)
    err = _fail_report(tmp_path, capsys, results, contains=key_path)
    assert "No radii were audited" not in err


def test_schema_checks_the_before_audit_of_a_repair(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    d = F.repair_result()
    d["before"]["student"]["clean"]["value"] = 7
    _fail_report(tmp_path, capsys, _write(tmp_path / "results.json", d), contains="before.student.clean.value")
    d = F.repair_result()
    d["before"]["kind"] = "robkd-repair"
    _fail_report(tmp_path, capsys, _write(tmp_path / "results.json", d), contains="before.kind")


def test_schema_error_is_one_line_whatever_the_key(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """A hostile key (newline, ESC, U+202E) is named visibly, on one line."""
    d = F.audit_result()
    d["student"]["per_radius"][0]["after_attack"]["x\n\x1b[2J\u202e"] = {"value": 5}
    err = _fail_report(tmp_path, capsys, _write(tmp_path / "results.json", d), contains="after_attack")
    assert err.count("\n") == 1 and "\x1b" not in err and "\u202e" not in err


def test_valid_fixtures_pass_the_schema(tmp_path: Path) -> None:
    for d in (F.audit_result(), F.audit_result(certify=True, prop2=True, gates_pass=True), F.repair_result()):
        assert load_results(_write(tmp_path / "results.json", d)) == d


# ----------------------------------------------------------------------------- output paths
def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    results = _write(tmp_path / "src" / "results.json", F.audit_result())
    a_file = _write(tmp_path / "taken", "keep me")
    _fail_report(tmp_path, capsys, results, out=a_file, contains="not a directory")
    _fail_report(tmp_path, capsys, results, out=a_file / "sub" / "deeper", contains="not a directory")
    assert a_file.read_text() == "keep me"


def test_unwritable_out_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    results = _write(tmp_path / "src" / "results.json", F.audit_result())
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the permission check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == locked else real(p, mode, *a, **k))
    try:
        _fail_report(tmp_path, capsys, results, out=locked, contains="not writable")
        _fail_report(tmp_path, capsys, results, out=locked / "new", contains="not writable")
    finally:
        locked.chmod(0o755)


def test_a_directory_in_the_way_rolls_back_every_file(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """report.html is an existing directory: the write fails after results.json, the SVGs and report.md were
    written; they are removed again (and the output directory this run created)."""
    results = _write(tmp_path / "src" / "results.json", F.audit_result())
    out = tmp_path / "out"
    (out / "report.html").mkdir(parents=True)
    _fail_report(tmp_path, capsys, results, out=out, contains="report.html")
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]


@pytest.mark.parametrize("fail_at", [1, 3, 5])
def test_disk_full_midway_is_one_line_and_leaves_nothing(tmp_path: Path, capsys, monkeypatch, fail_at: int) -> None:  # noqa: ANN001
    results = _write(tmp_path / "src" / "results.json", F.audit_result())
    real = Path.write_bytes
    calls: list[Path] = []

    def write_bytes(self: Path, data: bytes) -> int:
        calls.append(self)
        if len(calls) == fail_at:
            real(self, data[: len(data) // 2])  # half of it reached the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    _fail_report(tmp_path, capsys, results, out=tmp_path / "a" / "b", contains="No space left on device")
    assert len(calls) == fail_at


def test_file_size_limit_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """``ulimit -f``: the write fails with EFBIG (SIGXFSZ ignored, as a shell with the limit would run it)."""
    import resource

    results = _write(tmp_path / "src" / "results.json", F.audit_result())
    limit = 16 * 1024  # results.json, the SVGs and report.md fit, report.html (about 23 kB) does not

    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    before = snapshot(tmp_path)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run([sys.executable, "-m", "robkd.cli.main", "report", str(results), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, preexec_fn=preexec, env=env, cwd=REPO)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and 1 <= len(lines) <= 2, res.stderr
    assert "File too large" in res.stderr
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- user strings in reports
HOSTILE = "evil\x1b[31m\x07\x00\u202etxt.exe\u2066\u200b\x85\x7f\ufeff"
# code points that must never appear raw in a report (checked independently of robkd's own rule)
FORBIDDEN = ({c for c in range(0x20) if c not in (0x09, 0x0A)} | set(range(0x7F, 0xA0))
             | set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A)) | set(range(0x200B, 0x2010))
             | {0x061C, 0x2028, 0x2029, 0xFEFF})


def _hostile_result() -> dict:
    d = F.repair_result()
    d["teacher"]["model"]["path"] = f"models/{HOSTILE}.pt"
    d["student"]["model"]["path"] = f"/tmp/{HOSTILE}"
    d["config"]["teacher"] = HOSTILE
    d["config"][HOSTILE] = HOSTILE  # a hostile key too
    d["data"]["dataset"] = f"data-{HOSTILE}"
    d["data"]["class_names"] = [HOSTILE, "ok"]
    d["command"] = ["robkd", "audit", HOSTILE, f"--gate=student.clean >= 0.5 {HOSTILE}"]
    d["gates"][0]["gate"] = f"student.worst@0.1 >= 0.9*teacher.worst@0.1 {HOSTILE}"
    d["gates"][0]["reason"] = HOSTILE
    d["sanity"]["flags"] = [{"code": f"code-{HOSTILE}", "message": HOSTILE, "suggestion": HOSTILE, "model": HOSTILE}]
    d["environment"]["robkd"] = HOSTILE
    d["created"] = HOSTILE
    d["training"]["config"]["method"] = HOSTILE
    d["before"]["student"]["model"]["path"] = f"before-{HOSTILE}"
    return d


def _forbidden_in(data: bytes) -> list[str]:
    """Every forbidden code point in ``data`` (decoded as UTF-8, which must succeed), by name."""
    text = data.decode("utf-8")
    return sorted({f"U+{ord(ch):04X}" for ch in text if ord(ch) in FORBIDDEN or 0xD800 <= ord(ch) <= 0xDFFF})


def test_hostile_strings_are_made_visible_in_every_report_file(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    results = _write(tmp_path / "src" / "results.json", _hostile_result())
    out = tmp_path / "out\x1b[1m"  # the printed paths are user strings too
    res = run_cli(["report", str(results), "--out", str(out)], capsys)
    assert res.code == 0, res.err
    assert _forbidden_in(res.out.encode()) == [] and str(out / "report.md").replace("\x1b", "\\x1b") in res.out
    files = sorted(out.iterdir())
    assert {p.name for p in files} >= {"report.md", "report.html", "results.json"}
    for p in files:
        raw = p.read_bytes()
        for bad in (b"\x1b", b"\x07", b"\x00", "\u202e".encode(), "\u2066".encode(), "\u200b".encode()):
            assert bad not in raw, (p.name, bad)
        assert _forbidden_in(raw) == [], p.name
    md = (out / "report.md").read_text(encoding="utf-8")
    html = (out / "report.html").read_text(encoding="utf-8")
    for text in (md, html):  # shown, not dropped: the reader sees which characters were there
        assert "\\x1b" in text and "\\u202e" in text and "\\x07" in text and "\\x00" in text
    assert json.loads((out / "results.json").read_text()) == _hostile_result()  # the data itself is kept


def test_escape_functions_cover_controls_bidi_and_invisibles() -> None:
    from robkd.report.escape import esc_html, esc_md, esc_svg, esc_text, md_code_block, md_code_span

    for fn in (esc_text, esc_html, esc_md, esc_svg, md_code_block, md_code_span):
        out = fn(HOSTILE + "\ud800\U000e0041\u2028")
        assert _forbidden_in(out.encode("utf-8")) == [], fn.__name__
        assert "txt.exe" in out and "\\U000e0041" in out
    assert esc_text("a\tb\nc") == "a\tb\nc" and esc_text("a\tb\nc", keep="") == "a\\x09b\\x0ac"
    assert esc_text("naïve – ∞ 8/255 ‖g‖ 日本") == "naïve – ∞ 8/255 ‖g‖ 日本"  # printable text is untouched
    assert esc_html("\u202e<b>") == "\\u202e&lt;b&gt;"
    assert md_code_block("a\x1bb") == "```\na\\x1bb\n```"


# ----------------------------------------------------------------------------- committed results files
COMMITTED = sorted(p for root in ("reports", "audits") for p in (REPO / root).rglob("results.json"))


def test_committed_results_files_exist() -> None:
    assert COMMITTED, "no results.json under reports/ or audits/"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_results_files_pass_the_reader(path: Path) -> None:
    from robkd.auditing import AuditResult

    d = load_results(path)
    assert d == json.loads(path.read_text(encoding="utf-8"))
    assert AuditResult.load(path, tensors=False).to_dict() == d


@pytest.mark.parametrize("path", [p for p in COMMITTED if (p.parent / "report.md").is_file()],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_committed_reports_rerender_byte_identical(path: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    res = run_cli(["report", str(path), "--out", str(tmp_path)], capsys)
    assert res.code == 0, res.err
    committed = {p.name for p in path.parent.glob("report*") if p.is_file()}
    rendered = {p.name for p in tmp_path.glob("report*")}
    assert rendered == committed
    for name in sorted(committed):
        assert (tmp_path / name).read_bytes() == (path.parent / name).read_bytes(), name
