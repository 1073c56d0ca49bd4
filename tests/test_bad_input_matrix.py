"""The bad-input matrix of ``robkd audit`` / ``robkd certify`` (issue 12): flags, specs, gates, models that
misbehave at run time, filesystem faults. Every case: the documented exit code, at most two lines on
stderr, no traceback, nothing new left on disk. (Model/data files: test_hostile_files.py; results files and
reports: test_results_files.py; training: test_train_faults.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from badinput import expect_failure, run_cli

COMMON = ["--data", "fashion-mnist-slice", "--n", "16", "--eps", "0.05", "--attacks", "fgsm", "--batch-size", "16",
          "--sanity-n", "0"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, trained_cnn, trained_mlp):
    from robkd.models import save_model

    d = tmp_path_factory.mktemp("pair")
    return str(save_model(trained_cnn, d / "teacher.safetensors")), str(save_model(trained_mlp, d / "student.safetensors"))


# ----------------------------------------------------------------------------- flags, specs and gates
FLAG_CASES = {
    "gate divides by zero": (["--gate", "student.clean >= 1/0"], "divides by zero"),
    "gate constant overflows": (["--gate", "student.clean >= 9e9999"], "finite"),
    "gate product overflows": (["--gate", "student.clean >= 1e308*10"], "finite"),
    "gate zero denominator expression": (["--gate", "student.clean >= 0.5/(1-1)"], "divides by zero"),
    "gate unknown subject": (["--gate", "pupil.clean >= 0.5"], "gate"),
    "gate without comparison": (["--gate", "student.clean"], "gate"),
    "gate too long": (["--gate", "student.clean >= " + "+".join(["0.001"] * 200)], "longer"),
    "gate deeply nested": (["--gate", "student.clean >= " + "(" * 300 + "0.5" + ")" * 300], "gate"),
    "pgd with 20-digit steps": (["--attacks", "pgd-100000000000000000000"], "steps"),
    "pgd with zero steps": (["--attacks", "pgd-0"], "steps"),
    "pgd with zero restarts": (["--attacks", "pgd-5x0"], "restarts"),
    "mifgsm with huge steps": (["--attacks", "mifgsm-1000000"], "steps"),
    "eot with huge passes": (["--attacks", "pgd-5-eot99999999"], "EOT"),
    "attack listed twice": (["--attacks", "fgsm,FGSM"], "twice"),
    "empty attack list": (["--attacks", ","], "attack"),
    "Linf radius 1e9": (["--eps", "1e9"], "pixel"),
    "Linf radius 8 (meant 8/255)": (["--eps", "8"], "8/255"),
    "radius nan": (["--eps", "nan"], "radius"),
    "radius inf": (["--eps", "inf"], "radius"),
    "radius zero over zero": (["--eps", "0/0"], "radius"),
    "negative n": (["--n", "-5"], "n"),
    "zero batch size": (["--batch-size", "0"], "batch"),
    "negative seed": (["--seed", "-1"], "seed"),
    "negative sanity n": (["--sanity-n", "-1"], "sanity"),
    "zero llm steps": (["--llm", "--llm-steps", "0"], "llm_steps"),
    "unknown device": (["--device", "banana"], "device"),
    "cuda absent": (["--device", "cuda:7"], "cuda"),
    "resume without out": (["--resume"], "--out"),
    "nproc without launcher": (["--nproc-per-node", "2"], "torchrun"),
    "linear region without certify": (["--linear-region-radius"], "certify"),
    "input shape junk": (["--input-shape", "1,-28,28"], "input-shape"),
    "mean not numbers": (["--mean", "0.5,abc"], "mean"),
    "unknown split": (["--split", "holdout"], "split"),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flags_fail_before_any_work(pair, tmp_path, capsys, case):
    extra, why = FLAG_CASES[case]
    out = tmp_path / "out"
    argv = ["audit", *pair, *COMMON, *extra]
    if "--resume" not in extra:
        argv += ["--out", str(out)]
    expect_failure(argv, capsys, code=2, watch=[tmp_path], contains=why)
    assert not out.exists()


def _spec(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(text, encoding="utf-8")
    return p


SPEC_CASES = {
    "missing spec": (None, "spec"),
    "spec not TOML": ("this is = = not toml [", "spec"),
    "spec unknown key": ('attacks = ["fgsm"]\nfrobnicate = 3\n', "frobnicate"),
    "spec wrong type": ('llm_steps = "many"\n', "llm_steps"),
    "spec gate constant": ('gates = ["student.clean >= 1/0"]\n', "divides by zero"),
    "spec norm junk": ('norm = "L7"\n', "L7"),
}


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_bad_spec_files(pair, tmp_path, capsys, case):
    text, why = SPEC_CASES[case]
    spec = tmp_path / "missing.toml" if text is None else _spec(tmp_path, text)
    out = tmp_path / "out"
    expect_failure(["audit", *pair, *COMMON, "--spec", str(spec), "--out", str(out)],
                   capsys, code=2, watch=[tmp_path], contains=why)


# ----------------------------------------------------------------------------- models that misbehave at run time
USER_MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    class _Base(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.lin = nn.Linear(784, num_classes)

        def logits(self, x):
            return self.lin(x.flatten(1))


    class OneRow(_Base):
        def forward(self, x):
            return self.logits(x)[:1]


    class IntLogits(_Base):
        def forward(self, x):
            return (self.logits(x) * 100).round().long()


    class FailsUnderGrad(_Base):
        def forward(self, x):
            if torch.is_grad_enabled() and x.requires_grad:
                raise RuntimeError("custom kernel has no backward")
            return self.logits(x)


    class Raises(_Base):
        def forward(self, x):
            raise ValueError("weights for another input size\\nsecond line of a long message")


    class ThreeDim(_Base):
        def forward(self, x):
            return self.logits(x).unsqueeze(1)


    def one_row(num_classes):
        return OneRow(num_classes)


    def int_logits(num_classes):
        return IntLogits(num_classes)


    def fails_under_grad(num_classes):
        return FailsUnderGrad(num_classes)


    def raises(num_classes):
        return Raises(num_classes)


    def three_dim(num_classes):
        return ThreeDim(num_classes)
''')

MODEL_CASES = {
    "one row for any batch": ("one_row", "expected (batch, classes)"),
    "integer logits": ("int_logits", "floating-point"),
    "fails only under gradients": ("fails_under_grad", "differentiated"),
    "raises in forward": ("raises", "weights for another input size"),
    "3-d outputs": ("three_dim", "logits"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_misbehaving_models_exit_2_and_leave_no_state(pair, tmp_path, capsys, monkeypatch, case):
    factory, why = MODEL_CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    (work / "robkd_matrix_models.py").write_text(USER_MODELS, encoding="utf-8")
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    sd = work / "weights.pt"
    torch.save(torch.nn.Linear(784, 10).state_dict(), sd)
    sd.rename(work / "weights.pt")
    torch.save({f"lin.{k}": v for k, v in torch.nn.Linear(784, 10).state_dict().items()}, sd)
    out = tmp_path / "out"
    expect_failure(["audit", pair[0], str(sd), *COMMON, "--student-arch", f"robkd_matrix_models:{factory}",
                    "--mean", "0.286", "--std", "0.353", "--out", str(out)],
                   capsys, code=2, watch=[tmp_path], contains=why)
    assert not out.exists()


# ----------------------------------------------------------------------------- filesystem
def test_out_is_a_file(pair, tmp_path, capsys):
    f = tmp_path / "results"
    f.write_text("x")
    expect_failure(["audit", *pair, *COMMON, "--out", str(f)], capsys, watch=[tmp_path], contains="not a directory")


def test_out_under_a_file(pair, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    expect_failure(["audit", *pair, *COMMON, "--out", str(f / "sub" / "out")], capsys, watch=[tmp_path],
                   contains="not a directory")


def test_out_holding_an_audit_needs_resume_or_overwrite(pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["audit", *pair, *COMMON, "--out", str(out)], capsys).code == 0
    expect_failure(["audit", *pair, *COMMON, "--out", str(out)], capsys, watch=[tmp_path], contains="--overwrite")


def test_certify_out_is_a_file_and_radius_too_large(pair, tmp_path, capsys):
    f = tmp_path / "c"
    f.write_text("x")
    expect_failure(["certify", pair[1], "--data", "fashion-mnist-slice", "--n", "4", "--eps", "0.05", "--out", str(f)],
                   capsys, watch=[tmp_path], contains="not a directory")
    expect_failure(["certify", pair[1], "--data", "fashion-mnist-slice", "--n", "4", "--eps", "1e9",
                    "--out", str(tmp_path / "o")], capsys, watch=[tmp_path], contains="pixel")
    expect_failure(["certify", pair[1], "--data", "fashion-mnist-slice", "--n", "4", "--method", "smoothing",
                    "--sigma", "0", "--eps", "0.5", "--out", str(tmp_path / "o")], capsys, watch=[tmp_path],
                   contains="sigma")


def test_disk_full_while_writing_results_is_one_line_and_resumable(pair, tmp_path, capsys, monkeypatch):
    """ENOSPC at the results write: exit 2, one line, the attack progress kept; --resume then finishes."""
    import errno

    import robkd.auditing.result as result_mod

    out = tmp_path / "out"
    real = result_mod.AuditResult.write

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "results.json"))

    monkeypatch.setattr(result_mod.AuditResult, "write", full)
    res = run_cli(["audit", *pair, *COMMON, "--out", str(out)], capsys)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert res.code == 2 and len(lines) == 1 and "No space left" in lines[0] and "Traceback" not in res.err
    assert not (out / "results.json").exists() and (out / "state").is_dir()
    monkeypatch.setattr(result_mod.AuditResult, "write", real)
    assert run_cli(["audit", *pair, *COMMON, "--out", str(out), "--resume"], capsys).code == 0
    assert (out / "results.json").is_file()


def _robkd_subprocess(args, **kw):
    env = {**os.environ, "ROBKD_NO_PROGRESS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "robkd", *args], capture_output=True, text=True, env=env, **kw)


def test_file_size_limit_is_one_line_exit_2(pair, tmp_path):
    """``ulimit -f``: the write fails (SIGXFSZ ignored) and becomes one line, exit 2, not a silent kill."""
    import resource

    out = tmp_path / "out"

    def limit():  # 64 KiB: the models load, the results do not fit
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    r = _robkd_subprocess(["audit", *pair, *COMMON, "--out", str(out)], preexec_fn=limit, timeout=600)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and lines and "File too large" in lines[-1], r.stderr[-2000:]
    assert not (out / "results.json").exists()


def test_a_second_writer_to_one_out_is_refused(pair, tmp_path, capsys):
    """Another process holds --out: a second audit (even with --overwrite) is refused and deletes nothing."""
    out = tmp_path / "out"
    assert run_cli(["audit", *pair, *COMMON, "--out", str(out)], capsys).code == 0
    before = sorted(p.name for p in out.iterdir())
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom robkd.utils.outdir import OutDirLock\n"
         "with OutDirLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = expect_failure(["audit", *pair, *COMMON, "--out", str(out), "--overwrite"], capsys,
                             contains="another robkd run")
        assert f"pid {holder.pid}" in res.err
        assert sorted(p.name for p in out.iterdir() if p.name != ".robkd.lock") == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9 semantics): the lock is gone with it
    assert run_cli(["audit", *pair, *COMMON, "--out", str(out), "--overwrite"], capsys).code == 0
    assert not (out / ".robkd.lock").exists()


def test_internal_errors_exit_4_with_one_line(pair, tmp_path, capsys, monkeypatch):
    """A bug inside robkd (here: an injected one) is exit 4, never 1, and one line naming --debug."""
    import robkd.auditing.aggregate as aggregate

    def bug(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(aggregate, "transfer", bug)
    res = expect_failure(["audit", *pair, *COMMON, "--out", str(tmp_path / "out")], capsys, code=4,
                         contains=["internal error", "--debug"])
    assert "KeyError" in res.err


def test_long_multi_line_errors_are_cut_to_one_line(capsys):
    from robkd.cli.main import describe_failure
    from robkd.errors import ModelLoadError

    msg, code = describe_failure(ModelLoadError("first line\n" + "\n".join(f"  frame {i}" for i in range(140))))
    assert code == 2 and "\n" not in msg and msg.startswith("first line") and "--debug" in msg
    msg, code = describe_failure(RuntimeError("x" * 5000 + "\x1b[31m"))
    assert code == 4 and len(msg) < 600 and "\x1b" not in msg
    msg, code = describe_failure(MemoryError())
    assert code == 2 and "memory" in msg


def test_a_result_that_breaks_its_own_schema_is_an_internal_error(pair, tmp_path, capsys, monkeypatch):
    """The writer validates before writing; when the audit's own result fails, that is robkd's bug: exit 4
    (not 2, which would blame the user's input), one line, and no results file."""
    import robkd.auditing.result as result_mod
    from robkd.report.schema import ResultsError

    def broken(data, what):
        raise ResultsError(f"{what} breaks the results schema at student.clean: injected")

    monkeypatch.setattr(result_mod, "validate_results", broken)
    out = tmp_path / "out"
    expect_failure(["audit", *pair, *COMMON, "--out", str(out)], capsys, code=4, contains=["internal error", "own schema"])
    assert not (out / "results.json").exists()
