"""Progress (issue 14): timestamped lines without a terminal, a rich bar with logs above it on one, progress for
every audit phase, ``--quiet``, ``--dry-run``, ``--time-limit`` + ``--resume``, presets, and ``--help`` text."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from badinput import run_cli
from robkd.errors import UsageError

LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] audit: ")
# a tiny audit that still runs every phase: clean predictions, 2 attacks x 2 radii, certification, Prop-2, sanity
FAST = ["--data", "fashion-mnist-slice", "--n", "32", "--eps", "0.02,0.05", "--attacks", "fgsm,pgd-3",
        "--batch-size", "16", "--sanity-n", "8"]
PHASES = ["--certify", "ibp", "--llm", "--llm-steps", "2"]


@pytest.fixture
def show_progress(monkeypatch):
    """Progress on (conftest turns it off for the suite), one line per update."""
    monkeypatch.delenv("ROBKD_NO_PROGRESS", raising=False)
    monkeypatch.setenv("ROBKD_PROGRESS_INTERVAL", "0")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, trained_cnn, trained_mlp):
    from robkd.models import save_model

    d = tmp_path_factory.mktemp("models")
    return str(save_model(trained_cnn, d / "teacher.safetensors")), str(save_model(trained_mlp, d / "student.safetensors"))


@pytest.fixture(scope="module")
def whole(pair, tmp_path_factory):
    """One uninterrupted audit with every phase, progress lines on: (exit code, stderr, --out)."""
    import contextlib

    from robkd.cli.main import main

    out = tmp_path_factory.mktemp("whole") / "o"
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        mp.delenv("ROBKD_NO_PROGRESS", raising=False)
        mp.setenv("ROBKD_PROGRESS_INTERVAL", "0")
        code = main(["audit", *pair, *FAST, *PHASES, "--out", str(out)])
    return code, err.getvalue(), out


# ----------------------------------------------------------------------------- the line display
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_lines_are_rate_limited_with_rate_and_eta():
    from robkd.utils.progress import LineProgress

    buf, clock = io.StringIO(), Clock()
    p = LineProgress(buf, interval=10, clock=clock)
    task = p.add_task("audit: student pgd-20 eps=0.1", total=1000, unit="samples")
    for t, done in ((1, 50), (5, 300), (9.9, 600)):  # within the first 10 s: no line
        clock.t = t
        p.update(task, completed=done)
    clock.t = 11.0
    p.update(task, completed=640)  # 640 in 11 s = 58.2/s; 360 left: 6.2 s
    clock.t = 12.0
    p.update(task, advance=10)  # 1 s after the last line: none
    clock.t = 20.0
    p.update(task, completed=1000)  # the end: always a line
    p.update(task, completed=1000)  # a finished task stays quiet
    p.remove_task(task)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert all(re.match(r"^\[\d\d:\d\d:\d\d\] audit: student pgd-20 eps=0.1  ", ln) for ln in lines)
    assert lines[0].endswith("started (1000 samples)")
    assert lines[1].endswith("640/1000 (64%)  58.2 samples/s  ETA 0:00:06")
    assert lines[2].endswith("1000/1000 done in 0:00:20  50.0 samples/s")


def test_line_rate_leaves_out_resumed_work_and_uses_the_callers_clock():
    from robkd.utils.progress import LineProgress, format_duration

    buf, clock = io.StringIO(), Clock()
    p = LineProgress(buf, interval=0, clock=clock)
    task = p.add_task("train epoch 2/3", total=100, completed=40)  # resumed at batch 40: no unit given
    clock.t = 2.0
    p.update(task, completed=60)  # 20 batches in 2 s: 10/s, 40 left: 4 s
    t2 = p.add_task("suite", total=10)
    p.update(t2, completed=5, elapsed=5.0)  # the work began 5 s before its first report: 1/s, 5 s left
    lines = buf.getvalue().splitlines()
    assert lines[0].endswith("started (100 to do, 40 done before)")
    assert lines[1].endswith("60/100 (60%)  10.0 samples/s  ETA 0:00:04")
    assert lines[3].endswith("5/10 (50%)  1.0 samples/s  ETA 0:00:05")
    assert format_duration(3725) == "1:02:05" and format_duration(float("nan")) == "-:--:--"


def test_mode_follows_the_environment(monkeypatch):
    from robkd.utils import progress

    monkeypatch.delenv("ROBKD_NO_PROGRESS", raising=False)
    assert progress.progress_mode() == "lines"  # pytest's stderr is not a terminal
    monkeypatch.setenv("ROBKD_NO_PROGRESS", "1")
    assert progress.progress_mode() == "off"
    monkeypatch.delenv("ROBKD_NO_PROGRESS")
    progress.set_quiet(True)
    try:
        assert progress.progress_mode() == "off"
    finally:
        progress.set_quiet(False)
    monkeypatch.setenv("ROBKD_PROGRESS_INTERVAL", "2.5")
    assert progress.line_interval() == 2.5
    monkeypatch.setenv("ROBKD_PROGRESS_INTERVAL", "soon")
    assert progress.line_interval() == progress.DEFAULT_INTERVAL


def test_terminal_bar_has_an_eta_and_logs_print_above_it(capsys):
    """On a terminal, a log record goes through the bar's console (its own line), not glued to the bar."""
    from rich.console import Console

    from robkd.utils.progress import progress_bar

    term = io.StringIO()
    console = Console(file=term, force_terminal=True, width=120)
    handler = logging.StreamHandler(__import__("sys").stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with progress_bar(mode="bar", console=console, transient=False) as bar:
            task = bar.add_task("audit: teacher pgd-3", total=4, rate="")
            bar.update(task, advance=2)
            logging.getLogger("robkd.test").warning("wrote somewhere")
            with progress_bar() as inner:  # nested: the same live display
                assert inner is bar
            bar.update(task, advance=2)
    finally:
        root.removeHandler(handler)
    out = term.getvalue()
    assert "wrote somewhere\n" in out or "wrote somewhere\r\n" in out
    assert "wrote somewhere" not in capsys.readouterr().err
    assert "ETA" in out and "4/4" in out
    assert handler.stream is __import__("sys").stderr  # restored


# ----------------------------------------------------------------------------- event display and time limit
class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.n = 0

    def add_task(self, description, total=None, **kw):
        self.n += 1
        self.log.append(("add", description, total))
        return self.n

    def update(self, task, **kw):
        self.log.append(("update", task, kw.get("completed"), kw.get("advance")))

    def remove_task(self, task):
        self.log.append(("remove", task))


def test_event_display_nests_phases_and_closes_attack_tasks():
    from robkd.auditing.events import EventDisplay

    rec = Recorder()
    d = EventDisplay(rec)
    d("start", {"stage": "sanity checks (teacher and student)"})
    d("progress", {"model": "teacher", "attack": "pgd-200", "radius": 0.05, "done": 8, "total": 8, "seconds": 1.0})
    d("start", {"model": "student", "stage": "sanity: large radius", "total": 8})
    d("advance", {"model": "student", "n": 8})
    d("done", {"model": "student"})
    d("done", {})
    d("checkpoint", {"stage": "x"})
    assert rec.log == [
        ("add", "audit: sanity checks (teacher and student)", None),
        ("add", "audit: teacher pgd-200 eps=0.05", 8),
        ("update", 2, 8, None),
        ("remove", 2),  # a new phase closes the attack task
        ("add", "audit: student sanity: large radius", 8),
        ("update", 3, None, 8),
        ("remove", 3),
        ("remove", 1),
    ]


def test_time_limit_stops_only_at_checkpoints():
    from robkd.auditing.events import TimeLimit, TimeLimitReached, parse_duration

    clock, seen = Clock(), []
    tl = TimeLimit(60, lambda k, i: seen.append(k), start=0.0, clock=clock)
    clock.t = 59.0
    tl("checkpoint", {})
    clock.t = 61.0
    tl("progress", {})  # not a check point: goes on
    with pytest.raises(TimeLimitReached, match="time limit 0:01:00 reached after 0:01:01") as exc:
        tl("checkpoint", {})
    assert exc.value.exit_code == 2 and seen == ["checkpoint", "progress", "checkpoint"]
    assert [parse_duration(t) for t in ("90m", "2h", "3600s", "45", "1h30m", "0.5s", " 2 h ")] == \
        [5400, 7200, 3600, 45, 5400, 0.5, 7200]
    for bad in ("", "soon", "0", "-5", "5x", "1h30", "nan"):
        with pytest.raises(UsageError, match="--time-limit"):
            parse_duration(bad)


# ----------------------------------------------------------------------------- the CLI, stderr not a terminal
def test_cli_audit_prints_a_line_for_every_phase(whole):
    code, err, _ = whole
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if LINE.match(ln)]
    text = "\n".join(lines)
    for role in ("teacher", "student"):
        assert f"audit: {role} clean predictions  started (32 samples)" in text
        assert re.search(rf"audit: {role} clean predictions  32/32 done in ", text)
        for attack in ("fgsm", "pgd-3"):
            for eps in ("0.02", "0.05"):
                assert re.search(rf"audit: {role} {attack} eps={eps}  \d+/\d+ done in ", text), (role, attack, eps)
                assert f"audit: {role} {attack} eps={eps}  started" in text
        for eps in ("0.02", "0.05"):
            assert re.search(rf"audit: {role} certify ibp eps={eps}  32/32 done in ", text)
    for eps in ("0.02", "0.05"):
        assert re.search(rf"audit: pair prop2 eps={eps}  32/32 done in ", text)
    assert "audit: sanity checks (teacher and student)  started" in text
    assert re.search(r"audit: sanity checks \(teacher and student\)  done in \d:\d\d:\d\d", text)
    assert re.search(r"  \d+/\d+ \(\d+%\)  [\d,.]+ samples/s  ETA \d:\d\d:\d\d$", text, re.M)  # a line with rate and ETA
    assert not any("done in" in ln and "wrote" in ln for ln in err.splitlines())  # never glued to a log line


def test_quiet_and_no_progress_print_no_progress_line(pair, tmp_path, capsys, show_progress, monkeypatch):
    small = ["--data", "fashion-mnist-slice", "--n", "8", "--eps", "0.05", "--attacks", "fgsm", "--sanity-n", "0"]
    res = run_cli(["-q", "audit", *pair, *small], capsys)
    assert res.code == 0 and not any(LINE.match(ln) for ln in res.err.splitlines()), res.err
    monkeypatch.setenv("ROBKD_NO_PROGRESS", "1")
    res = run_cli(["audit", *pair, *small], capsys)
    assert res.code == 0 and not any(LINE.match(ln) for ln in res.err.splitlines()), res.err


# ----------------------------------------------------------------------------- --dry-run
def test_dry_run_checks_everything_and_attacks_and_writes_nothing(pair, tmp_path, capsys, monkeypatch):
    from robkd.attacks import Suite

    def no_attack(*a, **k):
        raise AssertionError("--dry-run attacked")

    monkeypatch.setattr(Suite, "run", no_attack)
    out = tmp_path / "o"
    res = run_cli(["audit", *pair, *FAST, "--certify", "ibp", "--out", out, "--dry-run", "--json"], capsys)
    assert res.code == 0, res.err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    est = json.loads(res.out)
    phases = {(p["model"], p["phase"]): p for p in est["phases"]}
    for role in ("teacher", "student"):  # passes = n x the attack's passes per sample (fgsm 1, pgd-3 3), per radius
        assert phases[(role, "fgsm eps=0.02")]["passes"] == 32 and phases[(role, "pgd-3 eps=0.05")]["passes"] == 96
        assert phases[(role, "clean predictions")]["passes"] == 32
        # sanity on 8 samples: large radius 20 + pgd-20 vs pgd-200 (220) + 2 radii x pgd-20 (40)
        assert phases[(role, "sanity checks (8 samples)")]["passes"] == 8 * (20 + 220 + 40)
        assert phases[(role, "certify ibp (2 radii)")]["seconds"] > 0
    assert est["total_seconds"] > 0 and est["n"] == 32
    # the optional analyses are estimated too: transfer (pgd-20 on the other model, every sample and radius at
    # most), the self-test (its attacks on 20 samples: fgsm 1 + pgd-3 3 passes) and the corruptions (2 x 1)
    res = run_cli(["audit", *pair, *FAST, "--dry-run", "--json", "--attacks", "fgsm,pgd-3,transfer", "--self-test",
                   "--corruptions", "fog,contrast", "--severities", "3"], capsys)
    assert res.code == 0, res.err
    phases = {(p["model"], p["phase"]): p for p in json.loads(res.out)["phases"]}
    for role in ("teacher", "student"):
        assert phases[(role, "transfer (pgd-20 on the other model, at most)")]["passes"] == 32 * 2 * 20
        assert phases[(role, "attack self-test (20 samples, 2 attacks)")]["passes"] == 20 * (1 + 3)
        assert phases[(role, "corruptions (2 x 1 severities)")]["passes"] == 32 * 2
        assert not any(p[1].startswith("transfer eps") for p in phases)
    res = run_cli(["audit", *pair, *FAST, "--dry-run"], capsys)
    assert res.code == 0 and "nothing was attacked or written" in res.out and "estimated total: ~" in res.out
    # bad input fails the dry run as it would fail the run (exit 2), still writing nothing
    res = run_cli(["audit", *pair, *FAST, "--dry-run", "--gate", "student.worst@0.3 >= 0.5"], capsys)
    assert res.code == 2 and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- --time-limit and --resume
def _comparable(out: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    data = json.loads((out / "results.json").read_text())
    keep = {k: data[k] for k in ("transfer", "prop2", "gates", "radii", "attacks")}
    for role in ("teacher", "student"):
        keep[role] = {k: v for k, v in data[role].items() if k != "timings"}
    keep["flags"] = [{k: v for k, v in f.items() if k != "value"} for f in data["sanity"]["flags"]]
    return keep, load_file(str(out / "samples.safetensors"))


def test_time_limit_stops_cleanly_and_resume_gives_the_same_results(pair, whole, tmp_path, capsys):
    args = ["audit", *pair, *FAST, *PHASES]
    out = tmp_path / "cut"
    res = run_cli([*args, "--out", out, "--time-limit", "0.001s"], capsys)
    assert res.code == 2, res.err
    assert "time limit 0:00:00 reached" in res.err and "--resume" in res.err and str(out) in res.err
    assert "error" not in res.err.lower() and "Traceback" not in res.err
    assert not (out / "results.json").exists() and (out / "state" / "suite-teacher.safetensors").exists()
    again = run_cli([*args, "--out", out, "--resume"], capsys)
    assert again.code == 0, again.err
    data = json.loads((out / "results.json").read_text())
    assert "teacher:fgsm@0.02" in data["resumed"]  # the work saved before the stop was not redone
    (a, ta), (b, tb) = _comparable(whole[2]), _comparable(out)
    assert a == b
    assert ta.keys() == tb.keys()
    for k in ta:  # bit for bit (adv_radius is NaN where no attack succeeded)
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, equal_nan=True, msg=k)


def test_time_limit_needs_out_and_a_duration(pair, capsys):
    from badinput import expect_failure

    expect_failure(["audit", *pair, *FAST, "--time-limit", "90m"], capsys, contains="--out")
    expect_failure(["audit", *pair, *FAST, "--time-limit", "soon", "--out", "/tmp/never-made"], capsys,
                   contains="duration")


# ----------------------------------------------------------------------------- presets
def test_presets_expand_as_documented_and_yield_to_spec_and_flags(tmp_path):
    from robkd.auditing.config import AuditConfig
    from robkd.auditing.presets import PRESETS
    from robkd.data import dataset_info

    rb = AuditConfig.from_spec(None, preset="robustbench", data="cifar10")
    assert rb.attacks == ["autoattack"] and rb.n == 10000 and rb.eps is None  # None: the dataset's radius, 8/255
    assert dataset_info("cifar10").default_eps == 8 / 255 and dataset_info("imagefolder").default_eps == 4 / 255
    assert dataset_info("fashion-mnist").default_eps == 0.1 and dataset_info("mnist").default_eps == 0.3
    assert AuditConfig.from_spec(None, preset="robustbench", data="cifar100", norm="L2").eps == [0.5]
    assert AuditConfig.from_spec(None, preset="robustbench", data="imagefolder").n == 5000
    assert AuditConfig.from_spec(None, preset="robustbench").n == 10000  # fashion-mnist: the whole test set
    q = AuditConfig.from_spec(None, preset="quick")
    assert (q.attacks, q.n, q.sanity_n, q.eps) == (["fgsm", "pgd-10"], 100, 16, None)
    assert set(PRESETS) == {"robustbench", "quick"}
    # precedence: flags > spec > preset > defaults
    spec = tmp_path / "a.toml"
    spec.write_text('attacks = ["pgd-5"]\nn = 50\n')
    s = AuditConfig.from_spec(spec, preset="quick")
    assert (s.attacks, s.n, s.sanity_n) == (["pgd-5"], 50, 16)
    f = AuditConfig.from_spec(spec, preset="quick", n=7, sanity_n=0)
    assert (f.attacks, f.n, f.sanity_n) == (["pgd-5"], 7, 0)
    with pytest.raises(UsageError, match="unknown preset 'nope': use one of robustbench, quick"):
        AuditConfig.from_spec(None, preset="nope")


def test_cli_preset_with_overrides_and_unknown_preset(pair, capsys):
    res = run_cli(["audit", *pair, "--data", "fashion-mnist-slice", "--preset", "quick", "--n", "20", "--dry-run",
                   "--json"], capsys)
    assert res.code == 0, res.err
    cfg = json.loads(res.out)["config"]
    assert (cfg["attacks"], cfg["n"], cfg["sanity_n"]) == (["fgsm", "pgd-10"], 20, 16)
    res = run_cli(["audit", *pair, "--preset", "fast"], capsys)
    assert res.code == 2 and "quick" in res.err and "robustbench" in res.err


# ----------------------------------------------------------------------------- --help
def test_help_never_shows_a_doubled_percent_sign(capsys):
    from robkd.cli.main import COMMANDS

    for cmd in [[], *[[c] for c in COMMANDS]]:
        res = run_cli([*cmd, "--help"], capsys)
        assert res.code == 0
        assert "%%" not in res.out, (cmd, [ln for ln in res.out.splitlines() if "%%" in ln])
    audit_help = run_cli(["audit", "--help"], capsys).out
    assert "95% Clopper-Pearson" in audit_help and "--time-limit" in audit_help and "robustbench" in audit_help


def test_descriptions_and_group_descriptions_are_written_like_help(capsys):
    from robkd.cli.main import _Parser

    p = _Parser(prog="x", description="95%% sure", epilog="100%% done")
    p.add_argument_group("g", "a 95%% interval")
    p.add_argument("--a", help="50%% off")
    text = p.format_help()
    assert "95% sure" in text and "a 95% interval" in text and "50% off" in text and "%%" not in text


def test_compute_bounds_reports_each_batch():
    from helpers import make_net
    from robkd.bounds.compute import compute_bounds

    net = make_net("mlp", 0)
    x = torch.rand(5, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    calls: list[int] = []
    lb, ub = compute_bounds(net, x, 0.01, method="ibp", batch_size=2, on_batch=calls.append)
    assert calls == [2, 2, 1]
    lb0, ub0 = compute_bounds(net, x, 0.01, method="ibp", batch_size=2)
    assert torch.equal(lb, lb0) and torch.equal(ub, ub0)


def test_certify_cli_prints_a_line_per_radius(tmp_path, capsys, show_progress, trained_mlp):
    from robkd.models import save_model

    model = save_model(trained_mlp, tmp_path / "m.safetensors")
    res = run_cli(["certify", model, "--data", "fashion-mnist-slice", "--n", "8", "--eps", "0.01,0.02",
                   "--method", "ibp", "--out", tmp_path / "c"], capsys)
    assert res.code == 0, res.err
    for eps in ("0.01", "0.02"):
        assert re.search(rf"^\[\d\d:\d\d:\d\d\] certify: ibp eps={eps}  started \(8 samples\)$", res.err, re.M)
        assert re.search(rf"^\[\d\d:\d\d:\d\d\] certify: ibp eps={eps}  8/8 done in \d:\d\d:\d\d", res.err, re.M)
