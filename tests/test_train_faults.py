"""Faults in ``robkd train`` / ``robkd repair``: diverging training, NaN teachers, stale temporary files, and the
bad-input matrix of both commands (issue 12: exit 2, one line, no traceback, nothing left on disk, before training).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from badinput import expect_failure, run_cli
from robkd.data import eval_subset, train_val_split
from robkd.distill import TrainConfig, Trainer, TrainingDivergedError, evaluate_robust, load_train_state
from robkd.distill.checks import finite_or_none, nonfinite_tensors
from robkd.errors import ModelRuntimeError, UsageError
from robkd.models import build_model, load_model, save_model

ZOO = Path(__file__).resolve().parents[1] / "robkd" / "zoo"
MLP = ["--arch", "robkd:mlp", "--arch-kwargs", '{"hidden": [16]}']
FAST = ["--data", "fashion-mnist-slice", "--epochs", "1", "--train-n", "128", "--batch-size", "64", "--val-n", "16",
        "--val-steps", "1", "--steps", "1"]


def _mlp(seed: int = 0, classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("robkd:mlp", input_shape=(1, 28, 28), num_classes=classes, mean=(0.286,), std=(0.353,),
                       dataset="fashion-mnist-slice", arch_kwargs={"hidden": [16]})


class _LateNaN(torch.nn.Module):
    """A teacher whose outputs turn NaN after its first ``good_calls`` forward passes (finite weights)."""

    def __init__(self, base: torch.nn.Module, good_calls: int = 1) -> None:
        super().__init__()
        self.base, self.good_calls, self.calls = base, good_calls, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.base(x)
        return out if self.calls <= self.good_calls else out * float("nan")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Model and data files for the matrix, in a folder of their own (the cases watch their tmp_path)."""
    d = tmp_path_factory.mktemp("inputs")
    z = np.load(ZOO.parent / "data" / "bundled" / "fashion_mnist_slice.npz")
    x, y = z["x_train"][:256], z["y_train"][:256].astype(np.int64)
    files = {k: d / f"{k}.npz" for k in ("neg", "big", "float")}
    neg = y.copy()
    neg[:5] = -1
    big = y.copy()
    big[:3] = 10
    np.savez(files["neg"], x=x, y=neg)
    np.savez(files["big"], x=x, y=big)
    np.savez(files["float"], x=x, y=y.astype(np.float32) + 0.5)
    files["teacher"] = save_model(_mlp(0), d / "teacher.safetensors")
    files["student5"] = save_model(_mlp(1, classes=5), d / "student5.safetensors")
    nan_t = _mlp(2)
    with torch.no_grad():
        next(nan_t.parameters()).view(-1)[0] = float("nan")
    files["nan_teacher"] = save_model(nan_t, d / "nan_teacher.safetensors")
    nan_s = _mlp(3)
    with torch.no_grad():
        list(nan_s.parameters())[-1].fill_(float("inf"))
    files["nan_student"] = save_model(nan_s, d / "nan_student.safetensors")
    inf_out = _mlp(4)  # finite weights, but logits that overflow to inf/NaN
    with torch.no_grad():
        list(inf_out.parameters())[-2].fill_(3e38)
    files["inf_out_teacher"] = save_model(inf_out, d / "inf_out_teacher.safetensors")
    for key, model in (("ts_student", _mlp(5)), ("ts_teacher5", _mlp(6, classes=5))):
        files[key] = d / f"{key}.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace is deprecated
            torch.jit.save(torch.jit.trace(model.net.eval(), torch.zeros(1, 1, 28, 28)), str(files[key]))
    return files


# ----------------------------------------------------------------------------- the bad-input matrix
def _train(out: Path, *extra: str) -> list[str]:
    return ["train", "--method", "st", *MLP, "--out", str(out), *FAST, *extra]


def _repair(teacher: Path, student: Path | None, out: Path, *extra: str) -> list[str]:
    stud = [str(student)] if student is not None else ["--student-arch", "robkd:mlp", "--arch-kwargs", '{"hidden": [16]}']
    return ["repair", str(teacher), *stud, "--method", "kd", "--out", str(out), *FAST, *extra]


def _case(name: str, inputs: dict[str, Path], t: Path) -> tuple[list[str], "str | list[str]"]:
    """(argv, a word the one-line error must contain) of the matrix case ``name``; ``t`` is the watched folder."""
    f, out = inputs, t / "m.safetensors"
    if name == "train-negative-labels":
        return _train(out, "--data", str(f["neg"]), "--eps", "0.1"), ["label", "-1"]
    if name == "train-kd-labels-beyond-teacher-classes":
        return (["train", "--method", "kd", "--teacher", str(f["teacher"]), *MLP, "--out", str(out), *FAST,
                 "--data", str(f["big"]), "--eps", "0.1"], "[0, 10)")
    if name == "train-float-labels":
        return _train(out, "--data", str(f["float"]), "--eps", "0.1"), ["label", ".5"]
    if name == "repair-negative-labels":
        return _repair(f["teacher"], None, out, "--no-audit", "--data", str(f["neg"]), "--eps", "0.1"), ["label", "-1"]
    if name == "repair-labels-beyond-classes":
        return _repair(f["teacher"], None, out, "--no-audit", "--data", str(f["big"]), "--eps", "0.1"), "[0, 10)"
    if name == "repair-class-mismatch":
        return _repair(f["teacher"], f["student5"], out, "--no-audit"), "classes"
    if name == "repair-class-mismatch-torchscript-teacher":  # no class count in the file: found by running it
        return _repair(f["ts_teacher5"], None, out, "--no-audit"), "classes"
    if name == "train-out-is-directory":
        (t / "adir").mkdir()
        return _train(t / "adir"), "directory"
    if name == "train-out-parent-is-file":
        (t / "afile").write_text("x")
        return _train(t / "afile" / "m.safetensors"), "not a directory"
    if name == "train-state-is-directory":
        (t / "sdir").mkdir()
        return _train(out, "--state", str(t / "sdir")), "directory"
    if name == "train-log-is-out":
        return _train(out, "--log", str(out)), "same path"
    if name == "repair-out-parent-is-file":
        (t / "afile").write_text("x")
        return _repair(f["teacher"], None, t / "afile" / "sub" / "m.pt", "--no-audit"), "not a directory"
    if name == "repair-audit-out-is-file":
        (t / "afile").write_text("x")
        return _repair(f["teacher"], None, out, "--audit-out", str(t / "afile")), "not a directory"
    if name == "repair-audit-out-parent-is-file":
        (t / "afile").write_text("x")
        return _repair(f["teacher"], None, out, "--audit-out", str(t / "afile" / "audit")), "not a directory"
    if name == "repair-torchscript-student-unsavable":
        return _repair(f["teacher"], f["ts_student"], out, "--no-audit"), "cannot save"
    if name == "repair-bad-audit-attack":
        return _repair(f["teacher"], None, out, "--audit-attacks", "pgd-20,nope"), "nope"
    if name == "repair-bad-audit-eps":
        return _repair(f["teacher"], None, out, "--audit-eps", "abc"), "abc"
    if name == "repair-audit-n-zero":
        return _repair(f["teacher"], None, out, "--audit-n", "0"), ["audit", "n must be"]
    if name == "train-resume-corrupt-state":
        (t / "m.safetensors.state.pt").write_bytes(b"not a training state")
        return _train(out, "--resume"), "training state"
    if name.startswith("train-flag-"):  # train-flag-<flag>=<value>
        return _train(out, "--" + name[len("train-flag-"):]), name[len("train-flag-"):].split("=")[0].replace("-", "_")
    if name.startswith("train-lr-"):
        return _train(out, f"--lr={name[len('train-lr-'):]}"), "lr"
    if name == "repair-nan-teacher":
        return _repair(f["nan_teacher"], None, out, "--no-audit"), "non-finite"
    if name == "repair-teacher-inf-outputs":
        return _repair(f["inf_out_teacher"], None, out, "--no-audit"), "outputs are non-finite"
    if name == "train-kd-nan-teacher":
        return ["train", "--method", "kd", "--teacher", str(f["nan_teacher"]), *MLP, "--out", str(out), *FAST], "non-finite"
    if name == "repair-nan-student":
        return _repair(f["teacher"], f["nan_student"], out, "--no-audit"), "student has non-finite weights"
    raise KeyError(name)


CASES = [
    "train-negative-labels", "train-kd-labels-beyond-teacher-classes", "train-float-labels", "repair-negative-labels",
    "repair-labels-beyond-classes", "repair-class-mismatch", "repair-class-mismatch-torchscript-teacher",
    "train-out-is-directory", "train-out-parent-is-file", "train-state-is-directory", "train-log-is-out",
    "repair-out-parent-is-file", "repair-audit-out-is-file", "repair-audit-out-parent-is-file",
    "repair-torchscript-student-unsavable", "repair-bad-audit-attack", "repair-bad-audit-eps", "repair-audit-n-zero",
    "train-lr-nan", "train-lr-inf", "train-lr--1", "train-lr-0", "train-flag-batch-size=0", "train-flag-momentum=nan",
    "train-flag-train-n=0", "train-flag-weight-decay=-1", "train-resume-corrupt-state", "repair-nan-teacher", "repair-teacher-inf-outputs",
    "train-kd-nan-teacher", "repair-nan-student",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_before_training(name, inputs, tmp_path, capsys):
    """Exit 2, one line, no traceback, and nothing written: each case is refused before any training step."""
    argv, word = _case(name, inputs, tmp_path)
    expect_failure(argv, capsys, code=2, watch=[tmp_path], contains=word)


# ----------------------------------------------------------------------------- divergence
def _strict_json(text: str):
    def bad(token: str):
        raise ValueError(f"{token} in a log")

    return json.loads(text, parse_constant=bad)


def _assert_finite_or_absent(state_path: Path) -> None:
    if state_path.exists():
        st = load_train_state(state_path)
        assert not st["finished"]
        assert nonfinite_tensors(st["model"]) == [] and nonfinite_tensors(st["best"]["state"] or {}) == []


def test_diverging_train_stops_keeps_last_good_state_and_writes_strict_logs(tmp_path, capsys):
    """lr 100 on a tiny MLP diverges within 3 epochs: exit 2 with one line naming the step and --lr; no model saved;
    the training state on disk (the last good one) holds finite weights; the epoch log is strict JSON."""
    out = tmp_path / "m.safetensors"
    argv = ["-q", "train", "--method", "st", *MLP, "--out", str(out), "--data", "fashion-mnist-slice", "--epochs", "3",
            "--train-n", "256", "--batch-size", "64", "--val-n", "32", "--val-steps", "1", "--lr", "100",
            "--schedule", "constant"]
    res = run_cli(argv, capsys)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert res.code == 2 and len(lines) == 1 and "Traceback" not in res.err, res.err
    assert "diverged at epoch" in lines[0] and "--lr" in lines[0]
    assert not out.exists()
    _assert_finite_or_absent(tmp_path / "m.safetensors.state.pt")
    log_file = tmp_path / "m.safetensors.log.jsonl"
    if log_file.exists():
        for line in log_file.read_text().splitlines():
            rec = _strict_json(line)
            assert all(v is None or np.isfinite(v) for v in rec.values() if isinstance(v, float))
    assert not list(tmp_path.glob(".*.tmp"))


def test_diverging_repair_of_the_bundled_pair_never_exits_0_nor_saves_nan(tmp_path, capsys):
    """The issue's repair on the bundled pair, made to diverge at once (huge --lr), with a checkpoint every step and
    the audit on: exit 2, no checkpoint, no audit written; resuming diverges again and leaves the good state as it was."""
    out = tmp_path / "r.safetensors"
    argv = ["-q", "repair", str(ZOO / "teacher.safetensors"), str(ZOO / "kd_student.safetensors"), "--out", str(out),
            "--data", "fashion-mnist-slice", "--epochs", "2", "--train-n", "128", "--batch-size", "64", "--val-n", "16",
            "--val-steps", "1", "--lr", "1e6", "--checkpoint-every", "1", "--no-before-audit", "--audit-n", "16",
            "--audit-attacks", "fgsm"]
    res = run_cli(argv, capsys)
    assert res.code == 2 and "diverged" in res.err and "Traceback" not in res.err, res.err
    assert not out.exists() and not (tmp_path / "r.safetensors.audit").exists()
    state = tmp_path / "r.safetensors.state.pt"
    _assert_finite_or_absent(state)
    before = state.read_bytes() if state.exists() else None
    res2 = run_cli([*argv, "--resume"], capsys)
    assert res2.code == 2 and "diverged" in res2.err, res2.err
    assert not out.exists()
    assert (state.read_bytes() if state.exists() else None) == before  # the last good state is never overwritten


def test_divergence_is_an_error_of_the_api_with_the_model_left_finite(fmnist_train, tmp_path):
    """Python API: TrainingDivergedError (exit code 2) before the backward pass of the bad step, so the model in
    memory keeps its last finite weights, and nothing non-finite is written."""
    tr, _ = train_val_split(fmnist_train, 0.1, seed=0)
    m = _mlp(0)
    cfg = TrainConfig(method="st", epochs=2, batch_size=64, lr=1e6, val_n=0, select="last", checkpoint_every=1)
    trainer = Trainer(m, cfg, eval_subset(tr, 256, seed=0), None, state_path=tmp_path / "s.pt", log_path=tmp_path / "l.jsonl",
                      show_progress=False)
    with pytest.raises(TrainingDivergedError, match=r"diverged at epoch \d/2, step \d/4.*--lr") as err:
        trainer.fit()
    assert err.value.exit_code == 2
    assert nonfinite_tensors(m) == []
    _assert_finite_or_absent(tmp_path / "s.pt")


# ----------------------------------------------------------------------------- NaN teachers
@pytest.fixture(scope="module")
def split(fmnist_train):
    tr, va = train_val_split(fmnist_train, 0.1, seed=0)
    return eval_subset(tr, 128, seed=0), eval_subset(va, 32, seed=0)


def test_nan_teacher_is_refused_when_the_trainer_is_built(split, tmp_path):
    """NaN weights, or NaN outputs on the first batch: refused at set-up, before fit() and before any state file."""
    tr, va = split
    nan_w = _mlp(1)
    with torch.no_grad():
        next(nan_w.parameters()).view(-1)[3] = float("nan")
    with pytest.raises(ModelRuntimeError, match="teacher has non-finite weights"):
        Trainer(_mlp(0), TrainConfig(method="kd", val_n=0, select="last"), tr, va, nan_w, state_path=tmp_path / "s.pt")
    nan_out = _LateNaN(_mlp(1), good_calls=0)
    with pytest.raises(ModelRuntimeError, match=r"teacher's outputs are non-finite \(NaN/inf\) on 64 of 64"):
        Trainer(_mlp(0), TrainConfig(method="kd", batch_size=64, val_n=0, select="last"), tr, va, nan_out)
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.parametrize("method,extra", [("kd", {}), ("kdiga", {}), ("kd", {"augment": "flip"}), ("kdiga-arda", {"steps": 1})])
def test_teacher_turning_nan_later_is_refused_before_the_first_step_or_at_it(split, tmp_path, method, extra):
    """Outputs that are fine on the probe batch but NaN afterwards: the teacher cache (clean, un-augmented inputs)
    refuses them before training; without a cache the first step names the teacher. No state is written."""
    tr, va = split
    cfg = TrainConfig(method=method, epochs=1, batch_size=64, lr=0.05, val_n=0, select="last", **extra)
    student = _mlp(0)
    trainer = Trainer(student, cfg, tr, va, _LateNaN(_mlp(1)), dataset="fashion-mnist", default_eps=0.1,
                      state_path=tmp_path / "s.pt", show_progress=False)
    with pytest.raises(ModelRuntimeError, match="teacher.*non-finite"):
        trainer.fit()
    assert not (tmp_path / "s.pt").exists() and nonfinite_tensors(student) == []


def test_nan_model_scores_zero_in_validation(split):
    """evaluate_robust (validation-based selection) never counts an all-NaN model correct, e.g. on label 0."""
    _, va = split
    m = _mlp(0)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    assert (va.y == 0).any()
    assert evaluate_robust(m, va, norm="Linf", eps=0.1, steps=1, step_size=0.025) == (0.0, 0.0)


# ----------------------------------------------------------------------------- state files
def test_resume_refuses_a_state_with_nan_weights(split, tmp_path):
    """A state written by an older robkd after it diverged (NaN weights) is refused, not resumed."""
    tr, _ = split
    cfg = TrainConfig(method="st", epochs=2, batch_size=64, val_n=0, select="last")
    Trainer(_mlp(0), cfg, tr, None, state_path=tmp_path / "s.pt", show_progress=False).fit(max_steps=1)
    st = torch.load(tmp_path / "s.pt", weights_only=True)
    next(iter(st["model"].values())).view(-1)[0] = float("nan")
    torch.save(st, tmp_path / "s.pt")
    with pytest.raises(UsageError, match="non-finite weights"):
        Trainer(_mlp(0), cfg, tr, None, state_path=tmp_path / "s.pt", show_progress=False).fit(resume=True)


@pytest.mark.parametrize("resume", [False, True])
def test_stale_temporary_files_of_own_names_are_removed(tmp_path, capsys, resume):
    """A kill during an atomic write leaves ``.<name>.<random>.tmp``; a fresh start and --resume delete those of the
    state, the log and the checkpoint, and nothing else."""
    out = tmp_path / "m.pt"
    argv = _train(out)
    if resume:  # a first, interrupted run: a state to resume from
        from robkd.distill import train

        train("st", "robkd:mlp", "fashion-mnist-slice", 1, out, arch_kwargs={"hidden": [16]}, train_n=128,
              batch_size=64, val_n=16, val_steps=1, steps=1, max_steps=1, show_progress=False)
        argv = [*argv, "--resume"]
    stale = [tmp_path / n for n in (".m.pt.state.pt.k2j4_x9a.tmp", ".m.pt.log.jsonl.a1b2c3d4.tmp", ".m.pt.zz9ab12q.tmp")]
    kept = [tmp_path / n for n in (".other.pt.k2j4_x9a.tmp", ".m.pt.state.pt.bak", "m.pt.state.pt.k2j4_x9a.tmp",
                                   ".m.pt.state.pt.k2j4_x9a.tmp.keep")]
    for p in stale + kept:
        p.write_bytes(b"partial")
    assert run_cli(argv, capsys).code == 0
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert nonfinite_tensors(load_model(out)) == []


def test_log_values_are_finite_or_null():
    """The log writers turn a non-finite number into null, so training_log.json / the .jsonl are strict JSON."""
    rec = {"epoch": 1, "loss": float("nan"), "val": [1.0, float("inf")], "nested": {"x": float("-inf")}, "s": "nan"}
    assert finite_or_none(rec) == {"epoch": 1, "loss": None, "val": [1.0, None], "nested": {"x": None}, "s": "nan"}
    json.dumps(finite_or_none(rec), allow_nan=False)


def test_a_second_training_run_on_one_out_is_refused(tmp_path, capsys):
    """Another process holds the checkpoint's lock: a second `robkd train --out` to it is refused at once and
    writes nothing; once the holder is gone (kill -9 semantics) the same command trains and saves."""
    import subprocess
    import sys

    out = tmp_path / "model.safetensors"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom robkd.utils.outdir import OutDirLock\n"
         "with OutDirLock(sys.argv[1], lock_name='.model.safetensors.lock'):\n    print('held', flush=True)\n"
         "    time.sleep(120)\n", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = expect_failure(_train(out), capsys, watch=[tmp_path], contains="another robkd run")
        assert f"pid {holder.pid}" in res.err
    finally:
        holder.kill()
        holder.wait()
    assert run_cli(_train(out), capsys).code == 0 and out.is_file()
    assert not (tmp_path / ".model.safetensors.lock").exists()


# ----------------------------------------------------------------------------- a run that never learned
def test_chance_level_warning_on_the_experiment_logs():
    """Golden values: the PGD-AT teacher of the all-methods experiment's seed 2 stayed at the constant solution
    (CE 2.303 = log 10 in every epoch); seed 0's learned. Runs without validation are not judged."""
    from robkd.distill.checks import chance_level_warning

    stuck = [{"epoch": e, "val_clean": v, "val_robust": v} for e, v in enumerate((0.1, 0.12667, 0.12667, 0.12667), 1)]
    learned = [{"epoch": 1, "val_clean": 0.7067, "val_robust": 0.5833}, {"epoch": 2, "val_clean": 0.7667, "val_robust": 0.6633}]
    text = chance_level_warning(stuck, 10)
    assert text is not None and "0.127" in text and "chance 0.100" in text and "4 epoch(s)" in text and "--lr" in text and "--eps-warmup" in text
    assert chance_level_warning(learned, 10) is None
    assert chance_level_warning(stuck, 2) is not None  # 0.127 is far below chance for two classes too
    assert chance_level_warning([{"epoch": 1, "loss": 2.3}], 10) is None  # no validation: nothing to judge
    assert chance_level_warning(stuck, None) is None
    # the threshold: 1.5x chance
    assert chance_level_warning([{"val_clean": 0.149}], 10) is not None and chance_level_warning([{"val_clean": 0.15}], 10) is None
