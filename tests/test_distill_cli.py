"""``robkd train`` / ``robkd repair`` in-process on the bundled Fashion-MNIST slice, and the Python API."""

from __future__ import annotations

import json

import pytest
import torch

import robkd.cli.main as cli_main
from robkd.models import load_model
from robkd.models.identity import model_sha256
from robkd.utils.io import sha256_file

def main(argv):
    """``robkd`` in-process, with only the command modules present in this checkout (others land in parallel)."""
    import importlib.util

    saved = dict(cli_main.COMMANDS)
    cli_main.COMMANDS.clear()
    cli_main.COMMANDS.update({k: v for k, v in saved.items() if importlib.util.find_spec(v) is not None})
    try:
        return cli_main.main(argv)
    finally:
        cli_main.COMMANDS.clear()
        cli_main.COMMANDS.update(saved)


FAST = ["--data", "fashion-mnist-slice", "--epochs", "1", "--train-n", "192", "--batch-size", "64",
        "--val-n", "32", "--val-steps", "2", "--steps", "2", "--lr", "0.05"]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("teach") / "teacher.pt"
    rc = main(["train", "--method", "at", "--arch", "robkd:cnn_small", "--out", str(out), *FAST])
    assert rc == 0
    return out


def test_fast_ard_provenance_records_epochs_and_passes(teacher_file, tmp_path):
    """Fast-ARD divides the epochs by m: the checkpoint says both what was asked and what ran."""
    out = tmp_path / "fard.safetensors"
    args = [a if a != "1" else "3" for a in FAST]  # --epochs 3
    assert main(["train", "--method", "fast-ard", "--teacher", str(teacher_file), "--arch", "robkd:cnn_small",
                 "--replays", "2", "--out", str(out), *args]) == 0
    prov = load_model(out).meta.provenance
    assert prov["epochs"] == 3 and prov["passes"] == 2 and prov["hyperparameters"]["replays"] == 2


def test_train_writes_loadable_self_describing_checkpoint(teacher_file):
    m = load_model(teacher_file)
    prov = m.meta.provenance
    assert prov["method"] == "at" and prov["data"] == "fashion-mnist-slice" and prov["epochs"] == 1
    assert prov["hyperparameters"]["eps"] == pytest.approx(0.1) and prov["hyperparameters"]["step_size"] == pytest.approx(0.025)
    assert prov["robkd_version"] and prov["seed"] == 0 and prov["train_samples"] == 192
    assert prov["device"] == "cpu" and prov["hyperparameters"]["device"] == "cpu"
    assert m.meta.arch == "robkd:cnn_small" and m.meta.input_shape == (1, 28, 28)
    lines = (teacher_file.parent / "teacher.pt.log.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    assert {"epoch", "lr", "ce_adv", "val_clean", "val_robust", "images_per_s"} <= set(rec)
    state = torch.load(teacher_file.parent / "teacher.pt.state.pt", weights_only=True)
    assert state["finished"]


def test_repair_fine_tunes_student_without_audit(tmp_path, teacher_file):
    student = tmp_path / "student.pt"
    assert main(["train", "--method", "st", "--arch", "robkd:cnn_small", "--out", str(student), *FAST, "--seed", "3"]) == 0
    out = tmp_path / "repaired.pt"
    rc = main(["repair", str(teacher_file), str(student), "--method", "kdiga", "--out", str(out), "--no-audit", *FAST])
    assert rc == 0
    m = load_model(out)
    prov = m.meta.provenance
    # the file hashes under their own keys; teacher_sha256 / student_init.sha256 are the models' identity (the audit's
    # weights_sha256), however the model was passed
    assert prov["method"] == "kdiga" and prov["teacher_file_sha256"] == sha256_file(teacher_file)
    assert prov["student_init"]["file_sha256"] == sha256_file(student)
    assert prov["teacher_sha256"] == model_sha256(load_model(teacher_file))
    assert prov["student_init"]["sha256"] == model_sha256(load_model(student))
    assert prov["hyperparameters"]["lambda_iga"] == 1.0 and prov["hyperparameters"]["iga_form"] == "per-sample"
    assert not (tmp_path / "repaired.pt.audit").exists()


def test_repair_new_student_with_audit(tmp_path, teacher_file):
    pytest.importorskip("robkd.auditing")
    out = tmp_path / "new.pt"
    rc = main(["repair", str(teacher_file), "--student-arch", "robkd:mlp", "--arch-kwargs", '{"hidden": [32]}',
               "--method", "kdiga-ardc", "--out", str(out), *FAST, "--audit-n", "40", "--audit-eps", "0.05"])
    assert rc in (0, 1)  # 1 only if a gate failed (none set here)
    assert load_model(out).meta.arch == "robkd:mlp"
    audit_dir = tmp_path / "new.pt.audit"
    assert (audit_dir / "results.json").exists()
    assert json.loads((audit_dir / "results.json").read_text())["config"]["device"] == "cpu"  # the training device
    assert json.loads((audit_dir / "training_log.json").read_text())["finished"]
    assert "Training" in (audit_dir / "report.md").read_text()


@pytest.mark.parametrize("argv", [
    ["train", "--method", "st", "--arch", "robkd:cnn_small", "--out", "X", "--epochs", "0", "--data", "fashion-mnist-slice"],
    ["train", "--method", "sgd", "--arch", "robkd:cnn_small", "--out", "X"],
    ["train", "--method", "kd", "--arch", "robkd:cnn_small", "--out", "X", "--data", "fashion-mnist-slice"],
    ["train", "--method", "st", "--arch", "robkd:nope", "--out", "X", "--data", "fashion-mnist-slice"],
    ["train", "--method", "at", "--arch", "robkd:cnn_small", "--out", "X", "--eps", "-1", "--data", "fashion-mnist-slice"],
    ["train", "--method", "st", "--arch", "robkd:cnn_small", "--out", "X", "--arch-kwargs", "{bad", "--data", "fashion-mnist-slice"],
    ["repair", "missing-teacher.pt", "--student-arch", "robkd:cnn_small", "--out", "X", "--data", "fashion-mnist-slice"],
    ["repair", "TEACHER", "--out", "X", "--data", "fashion-mnist-slice"],
    ["repair", "TEACHER", "--student-arch", "robkd:cnn_small", "--method", "at", "--out", "X"],
])
def test_bad_input_exits_2(tmp_path, teacher_file, argv, capsys):
    argv = [str(teacher_file) if a == "TEACHER" else (str(tmp_path / "x.pt") if a == "X" else a) for a in argv]
    assert main(argv) == 2
    assert not (tmp_path / "x.pt").exists()


def test_python_api_returns_model_and_log(tmp_path):
    from robkd.distill import train

    model, log = train("trades", "robkd:mlp", "fashion-mnist-slice", 1, tmp_path / "m.pt", arch_kwargs={"hidden": [16]},
                       train_n=128, batch_size=64, val_n=0, select="last", steps=1, show_progress=False)
    assert log.finished and len(log.records) == 1 and "kl_rob" in log.records[0]
    assert model.meta.provenance["method"] == "trades"
    loaded = load_model(tmp_path / "m.pt")
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))


def test_repair_state_dict_student_with_student_arch(tmp_path, teacher_file):
    from robkd.models import build_model

    torch.manual_seed(0)
    s = build_model("robkd:cnn_small", input_shape=(1, 28, 28), num_classes=10)
    torch.save(s.net.state_dict(), tmp_path / "sd.pt")
    out = tmp_path / "r.pt"
    rc = main(["repair", str(teacher_file), str(tmp_path / "sd.pt"), "--student-arch", "robkd:cnn_small",
               "--method", "kd", "--out", str(out), "--no-audit", *FAST])
    assert rc == 0
    assert load_model(out).meta.provenance["student_init"]["file_sha256"] == sha256_file(tmp_path / "sd.pt")


def test_repair_given_student_reports_before_and_after(tmp_path, teacher_file):
    from robkd.auditing import audit

    student = tmp_path / "student.pt"
    assert main(["train", "--method", "st", "--arch", "robkd:cnn_small", "--out", str(student), *FAST, "--seed", "3"]) == 0
    out = tmp_path / "repaired.pt"
    rc = main(["repair", str(teacher_file), str(student), "--method", "kd", "--out", str(out), *FAST,
               "--audit-n", "40", "--audit-eps", "0.05", "--audit-attacks", "fgsm"])
    assert rc == 0
    d = json.loads((tmp_path / "repaired.pt.audit" / "results.json").read_text())
    assert d["kind"] == "robkd-repair" and d["before"]["kind"] == "robkd-audit"
    # the before block is the audit of the student as given: an independent audit with the same settings agrees
    ref = audit(teacher_file, student, data="fashion-mnist-slice", n=40, eps=[0.05], attacks=["fgsm"], seed=0).to_dict()
    assert d["before"]["student"]["clean"] == ref["student"]["clean"]
    assert d["before"]["student"]["per_radius"] == ref["student"]["per_radius"]
    assert d["before"]["teacher"]["per_radius"] == d["teacher"]["per_radius"]  # same samples, same teacher
    after_m, before_m = d["student"]["model"], d["before"]["student"]["model"]
    assert after_m["path"] == str(out) and before_m["path"] == str(student)
    assert after_m["weights_sha256"] != before_m["weights_sha256"]
    assert "Before and after repair" in (tmp_path / "repaired.pt.audit" / "report.md").read_text()
    # --no-before-audit: a plain audit result
    out2 = tmp_path / "repaired2.pt"
    assert main(["repair", str(teacher_file), str(student), "--method", "kd", "--out", str(out2), *FAST,
                 "--audit-n", "40", "--audit-eps", "0.05", "--audit-attacks", "fgsm", "--no-before-audit"]) == 0
    d2 = json.loads((tmp_path / "repaired2.pt.audit" / "results.json").read_text())
    assert d2["kind"] == "robkd-audit" and "before" not in d2


@pytest.mark.parametrize("command", ["train", "repair"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "cuda:99", "gpu", "mps"])
def test_unavailable_device_exits_2_with_one_line(tmp_path, teacher_file, capsys, command, device):
    if device.startswith("cuda") and torch.cuda.is_available() and int(device.partition(":")[2] or 0) < torch.cuda.device_count():
        pytest.skip("this CUDA device exists here")
    if device == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        pytest.skip("MPS exists here")
    out = tmp_path / "x.pt"
    if command == "train":
        argv = ["train", "--method", "st", "--arch", "robkd:cnn_small", "--out", str(out)]
    else:
        argv = ["repair", str(teacher_file), "--student-arch", "robkd:cnn_small", "--out", str(out)]
    capsys.readouterr()
    assert main([*argv, *FAST, "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and device in err[0], err
    assert not out.exists()


def test_python_api_device_cpu_is_the_default(tmp_path):
    from robkd.distill import train

    kw = dict(arch_kwargs={"hidden": [16]}, train_n=64, batch_size=32, val_n=0, select="last", steps=1, show_progress=False)
    a, _ = train("at", "robkd:mlp", "fashion-mnist-slice", 1, tmp_path / "a.pt", **kw)
    b, _ = train("at", "robkd:mlp", "fashion-mnist-slice", 1, tmp_path / "b.pt", device="cpu", **kw)
    assert sha256_file(tmp_path / "a.pt") == sha256_file(tmp_path / "b.pt")
    assert load_model(tmp_path / "b.pt").meta.provenance["device"] == "cpu"
