"""`robkd demo` mechanics on a tiny zoo (fast), manifest verification, and the example audit specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_zoo(trained_mlp, fmnist_train, tmp_path_factory):
    """A zoo directory in the bundled layout: three tiny models and a manifest with their hashes."""
    from helpers import train_plain

    from robkd.models import build_model, save_model
    from robkd.utils.io import sha256_file

    root = tmp_path_factory.mktemp("zoo")
    kd = train_plain(build_model("robkd:mlp", input_shape=(1, 28, 28), num_classes=10, dataset="fashion-mnist",
                                  arch_kwargs={"hidden": [32]}), fmnist_train, epochs=1, seed=5)
    files = {"teacher": trained_mlp, "kd_student": kd, "kdiga_student": kd}
    manifest = {"description": "test zoo", "files": {}}
    for role, model in files.items():
        p = save_model(model, root / f"{role}.safetensors")
        manifest["files"][role] = {"file": p.name, "sha256": sha256_file(p), "command": f"robkd train ... ({role})"}
    log = [{"epoch": 1, "lr": 0.01, "kd": 0.9, "iga": 0.1, "loss": 1.0, "val_clean": 0.7, "val_robust": 0.2}]
    (root / "kdiga_student.log.json").write_text(json.dumps({"records": log, "config": {"method": "kdiga"}}))
    manifest["files"]["kdiga_student"]["training_log"] = "kdiga_student.log.json"
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _main(argv: list[str], monkeypatch) -> int:  # noqa: ANN001
    import importlib.util

    import robkd.cli.main as cli_main

    monkeypatch.setattr(cli_main, "COMMANDS", {k: v for k, v in cli_main.COMMANDS.items() if importlib.util.find_spec(v)})
    return cli_main.main(argv)


def test_demo_short_repair(tiny_zoo: Path, tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    from robkd.zoo import DEMO_AUDIT

    out = tmp_path / "demo"
    monkeypatch.setitem(DEMO_AUDIT, "data", "fashion-mnist-slice")
    monkeypatch.setitem(DEMO_AUDIT, "eps", [0.02])
    monkeypatch.setitem(DEMO_AUDIT, "attacks", ["fgsm"])
    monkeypatch.setitem(DEMO_AUDIT, "gates", ["student.worst@0.02 >= 0.8*teacher.worst@0.02"])
    code = _main(["demo", "--zoo", str(tiny_zoo), "--out", str(out), "--n", "60", "--epochs", "1", "--train-n", "200"], monkeypatch)
    printed = capsys.readouterr().out
    assert "before repair: gates" in printed and "after repair:" in printed
    for p in ("report.html", "report.md", "results.json", "before/report.html", "before/results.json",
              "kdiga_student_short.safetensors"):
        assert (out / p).is_file(), p
    assert not (out / ".repair-state.pt").exists()
    combined = json.loads((out / "results.json").read_text())
    before = json.loads((out / "before" / "results.json").read_text())
    assert combined["before"] == before and combined["kind"] == "robkd-repair"
    # exit 0 only when the story held: the gate failed before the repair and passed after it
    assert code == (0 if (not before["gates_passed"] and combined["gates_passed"]) else 1)
    assert [r["epoch"] for r in combined["training"]["records"]] == [1]
    html = (out / "report.html").read_text()
    for heading in ("Before and after repair", "Training (repair)", "Robust accuracy"):
        assert heading in html
    # the repaired checkpoint is a loadable robkd model trained by KDIGA from the KD student
    from robkd.models import load_model

    m = load_model(out / "kdiga_student_short.safetensors")
    assert m.meta.provenance["method"] == "kdiga"


def test_demo_full_uses_bundled_student(tiny_zoo: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from robkd.zoo import DEMO_AUDIT, run_demo

    monkeypatch.setitem(DEMO_AUDIT, "eps", [0.02])
    monkeypatch.setitem(DEMO_AUDIT, "attacks", ["fgsm"])
    monkeypatch.setitem(DEMO_AUDIT, "gates", ["student.clean >= 0.5"])
    res = run_demo(tmp_path / "d", full=True, zoo_dir=tiny_zoo, data="fashion-mnist-slice", audit_overrides={"n": 40})
    assert res.combined["training"]["records"][0]["kd"] == 0.9  # the bundled log
    assert res.combined["demo"]["full"] is True
    assert not (tmp_path / "d" / "kdiga_student_short.safetensors").exists()
    # the bundled KDIGA student in this zoo is the KD student: the after-audit equals the before-audit's student
    assert res.after["student"]["per_radius"] == res.before["student"]["per_radius"]


def test_demo_rejects_tampered_or_missing_zoo(tiny_zoo: Path, tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    import shutil

    bad = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, bad)
    with open(bad / "kd_student.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    assert _main(["demo", "--zoo", str(bad), "--out", str(tmp_path / "o")], monkeypatch) == 2
    assert "does not match the manifest" in capsys.readouterr().err
    assert _main(["demo", "--zoo", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], monkeypatch) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    assert _main(["demo", "--zoo", str(tiny_zoo), "--n", "0"], monkeypatch) == 2
    assert not (tmp_path / "o" / "report.html").exists()


def test_audit_specs_load_and_match_the_demo() -> None:
    from robkd.auditing import AuditConfig
    from robkd.zoo import DEMO_AUDIT

    cfg = AuditConfig.from_spec(REPO / "audits" / "demo.toml")
    for k, v in DEMO_AUDIT.items():
        assert getattr(cfg, k) == v, k
    cifar = AuditConfig.from_spec(REPO / "audits" / "cifar10-template.toml")
    assert cifar.data == "cifar10" and len(cifar.eps) == 8 and cifar.eps[-1] == pytest.approx(8 / 255)


def test_write_manifest_roundtrip(tiny_zoo: Path, tmp_path: Path) -> None:
    import shutil

    from robkd.errors import ModelLoadError, UsageError
    from robkd.utils.io import sha256_file
    from robkd.zoo import load_manifest, write_manifest

    z = tmp_path / "z"
    shutil.copytree(tiny_zoo, z)
    (z / "manifest.json").unlink()
    entries = {r: {"file": f"{r}.safetensors", "command": f"cmd {r}"} for r in ("teacher", "kd_student", "kdiga_student")}
    entries["kdiga_student"]["training_log"] = "kdiga_student.log.json"
    write_manifest(z, entries, description="roundtrip")
    m = load_manifest(z)
    assert m["teacher"].sha256 == sha256_file(z / "teacher.safetensors") and m["kd_student"].command == "cmd kd_student"
    assert m["kdiga_student"].training_log == z / "kdiga_student.log.json"
    with pytest.raises(UsageError, match="needs entries"):
        write_manifest(z, {"teacher": entries["teacher"]})
    with pytest.raises(ModelLoadError, match="does not exist"):
        write_manifest(z, {**entries, "teacher": {"file": "nope.safetensors", "command": "x"}})


def test_bundled_zoo_is_intact_and_tells_the_story(fmnist_test) -> None:
    """The committed demo models match their manifest; the KD student is far less robust than the teacher."""
    from robkd.distill import evaluate_robust
    from robkd.models import check_compatible, load_model
    from robkd.zoo import load_manifest

    zoo = load_manifest()  # verifies every SHA-256 (models and the training log)
    assert all("scripts/table3_fashion_mnist.py" in zoo[r].command for r in ("teacher", "kd_student"))
    assert zoo["kdiga_student"].command.startswith("robkd repair robkd/zoo/teacher.safetensors robkd/zoo/kd_student.safetensors")
    models = {role: load_model(e.path) for role, e in zoo.items()}
    check_compatible(models["teacher"], models["kd_student"])
    prov = models["kdiga_student"].meta.provenance
    assert prov["method"] == "kdiga"
    # the KDIGA student is the bundled KD student, repaired (not a separately trained model)
    from robkd.utils.io import sha256_file

    # the committed provenance predates the model identity hash: its student_init sha256 is the file's
    assert prov["student_init"]["sha256"] == sha256_file(zoo["kd_student"].path)
    assert models["kd_student"].meta.provenance["method"] == "kd"
    sub = fmnist_test.select(list(range(200)))
    rob = {r: evaluate_robust(m, sub, norm="Linf", eps=0.1, steps=5, step_size=0.03, seed=0)[1] for r, m in models.items()}
    assert rob["teacher"] > rob["kd_student"] + 0.15
    assert rob["kdiga_student"] > rob["kd_student"] + 0.15


@pytest.mark.slow
def test_bundled_demo_tells_its_story_in_under_five_minutes(tmp_path: Path) -> None:
    """The real `robkd demo` on the bundled pair and the full Fashion-MNIST: the gate fails for the KD
    student and passes after the short KDIGA repair, within the README's five minutes."""
    from robkd.data import load_dataset
    from robkd.errors import DataError
    from robkd.zoo import run_demo

    try:
        load_dataset("fashion-mnist", "test")
    except DataError:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    res = run_demo(tmp_path / "demo")
    assert res.story_holds, ([g["reason"] for g in res.before["gates"]], [g["reason"] for g in res.after["gates"]])
    b, a = res.before, res.after
    assert a["student"]["per_radius"][-1]["worst"]["value"] > b["student"]["per_radius"][-1]["worst"]["value"] + 0.15
    assert res.seconds < 300
