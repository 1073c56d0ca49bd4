"""The Python API ``robkd.auditing.audit``: in-memory models, metadata filling, resume, real-data sanity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import robkd
from robkd.auditing import AuditResult, audit
from robkd.errors import IncompatibleModelsError, ModelLoadError, RobkdError, UsageError

FAST = dict(data="fashion-mnist-slice", n=48, eps=[0.02, 0.05], attacks=["fgsm", "pgd-3"], batch_size=48)


def test_api_with_in_memory_models_and_metadata_filling(trained_cnn, trained_mlp):
    from robkd.models import RobustModel
    from robkd.types import ModelMeta

    # a bare wrapper with no shape/class metadata: filled from the data and a forward pass
    bare = RobustModel(trained_mlp.net, ModelMeta(mean=trained_mlp.meta.mean, std=trained_mlp.meta.std))
    res = robkd.audit(trained_cnn, bare, gates=["student.clean >= 0.1"], gate_on="point", **FAST)
    assert isinstance(res, AuditResult) and res.gates_passed and res.exit_code == 0
    assert bare.meta.input_shape == (1, 28, 28) and bare.meta.num_classes == 10
    d = res.to_dict()
    assert d["student"]["model"]["loaded_by_audit"] is False and "file_sha256" not in d["student"]["model"]
    assert len(d["student"]["model"]["weights_sha256"]) == 64
    assert d["config"]["student"].startswith("<in-memory")
    assert d["command"] is None
    # metric() resolves gate references
    m = res.metric("student.worst@0.05")
    assert m.point == d["student"]["per_radius"][1]["worst"]["value"]
    assert res.metric("transfer.ratio@0.05").point == pytest.approx(
        d["student"]["per_radius"][1]["worst"]["value"] / d["teacher"]["per_radius"][1]["worst"]["value"])
    # JSON is strict and round-trips through write/load
    json.dumps(d, allow_nan=False)


def test_api_rejects_bad_input_before_writing(trained_cnn, tmp_path):
    from robkd.models import build_model

    out = tmp_path / "o"
    other = build_model("robkd:mlp", input_shape=(1, 28, 28), num_classes=7, arch_kwargs={"hidden": [4]})
    with pytest.raises(IncompatibleModelsError):
        audit(trained_cnn, other, out_dir=out, **FAST)
    with pytest.raises(UsageError):
        audit(trained_cnn, trained_cnn, out_dir=out, **{**FAST, "n": 0})
    with pytest.raises(UsageError, match="unknown key"):
        audit(trained_cnn, trained_cnn, out_dir=out, epsilon=0.1, **FAST)
    with pytest.raises(ModelLoadError, match="not found"):
        audit(trained_cnn, "not-a-model-file", out_dir=out, **FAST)
    with pytest.raises(UsageError, match="path or a torch.nn.Module"):
        audit(trained_cnn, 42, out_dir=out, **FAST)
    with pytest.raises(RobkdError):
        audit(trained_cnn, trained_cnn, out_dir=out, gates=["teacher.worst@0.07 > 0"], **FAST)
    assert not out.exists()


def test_write_and_load_round_trip(trained_cnn, trained_mlp, tmp_path):
    res = audit(trained_cnn, trained_mlp, out_dir=tmp_path / "a", **FAST)
    back = AuditResult.load(tmp_path / "a")
    assert back.to_dict() == res.to_dict()
    assert set(back.tensors) == set(res.tensors)
    assert torch.equal(back.tensors["student.broken_by"], res.tensors["student.broken_by"])
    assert not list((tmp_path / "a").glob(".*.tmp"))  # no temporary files left behind
    bad = tmp_path / "b"
    bad.mkdir()
    (bad / "results.json").write_text(json.dumps({"schema_version": "0"}))
    with pytest.raises(UsageError, match="schema"):
        AuditResult.load(bad)


class _Interrupt(Exception):
    pass


def test_resume_skips_finished_work(trained_cnn, trained_mlp, tmp_path, monkeypatch):
    import robkd.attacks.base as base

    calls: list[tuple[str, float]] = []
    real_run = base.Attack.run

    def counting_run(self, model, x, y, **kw):
        if self.name in FAST["attacks"]:  # the suite's attacks (the sanity checks run extra ones every time)
            calls.append(("student" if model is trained_mlp else "teacher", self.name, self.eps))
        return real_run(self, model, x, y, **kw)

    monkeypatch.setattr(base.Attack, "run", counting_run)
    out = tmp_path / "r"

    # a reference run without interruption
    ref = audit(trained_cnn, trained_mlp, **FAST)
    student_calls = [c for c in calls if c[0] == "student"]
    assert len(student_calls) > 0 and len(calls) > len(student_calls)
    calls.clear()

    # interrupt while the student is being attacked: the teacher is finished and saved
    def stop_in_student(kind, info):
        if info.get("model") == "student" and kind == "progress":  # (its clean predictions report first)
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        audit(trained_cnn, trained_mlp, out_dir=out, on_event=stop_in_student, **FAST)
    assert (out / "state" / "suite-teacher.safetensors").exists()
    assert not (out / "results.json").exists()
    assert any(c[0] == "student" for c in calls)  # it was interrupted inside the student's first attack
    calls.clear()

    # without --resume an interrupted audit is refused, with it nothing finished is redone
    with pytest.raises(UsageError, match="resume"):
        audit(trained_cnn, trained_mlp, out_dir=out, **FAST)
    res = audit(trained_cnn, trained_mlp, out_dir=out, resume=True, **FAST)
    assert calls == student_calls  # only the student's attacks ran, each once
    d = res.to_dict()
    assert sorted(d["resumed"]) == sorted(f"teacher:{a}@{r}" for a in ("fgsm", "pgd-3") for r in ("0.02", "0.05"))
    # same figures as the uninterrupted run
    for role in ("teacher", "student"):
        assert d[role]["per_radius"] == ref.to_dict()[role]["per_radius"]
    calls.clear()

    # resuming a finished audit recomputes no attack at all
    res2 = audit(trained_cnn, trained_mlp, out_dir=out, resume=True, **FAST)
    assert calls == []
    assert res2.to_dict()["student"]["per_radius"] == d["student"]["per_radius"]
    # a different setting cannot resume this state
    with pytest.raises(UsageError, match="differs in"):
        audit(trained_cnn, trained_mlp, out_dir=out, resume=True, **{**FAST, "seed": 1})


def test_non_robust_pair_on_real_fashion_mnist_collapses(st_pair_fmnist):
    teacher, student = st_pair_fmnist
    res = audit(teacher, student, data="fashion-mnist", n=200, eps=[0.1], attacks=["pgd-10"], batch_size=200)
    d = res.to_dict()
    assert d["data"]["n"] == 200
    for role in ("teacher", "student"):
        assert d[role]["clean"]["value"] > 0.8
    # standard training gives (almost) no robustness at the usual Fashion-MNIST radius: the CNN collapses;
    # the MLP keeps ~12-15% (torchattacks PGD-100/200 and APGD-CE measure the same on this model)
    assert d["teacher"]["per_radius"][0]["worst"]["value"] <= 0.05
    assert d["student"]["per_radius"][0]["worst"]["value"] <= 0.25
    assert d["student"]["per_radius"][0]["worst"]["value"] <= d["student"]["clean"]["value"] - 0.6


def test_model_against_itself_transfers_perfectly(st_pair_fmnist):
    teacher, _ = st_pair_fmnist
    d = audit(teacher, teacher, data="fashion-mnist", n=100, eps=[0.02], attacks=["pgd-10"], batch_size=100).to_dict()
    t = d["transfer"][0]
    assert d["teacher"]["per_radius"][0]["worst"]["k"] > 20
    assert t["lost"]["k"] == 0 and abs(t["ratio"]["value"] - 1.0) < 1e-12


def test_sanity_n_controls_the_attack_based_checks(trained_cnn):
    """Input quantisation masks the gradient: the cheap check sees zero gradients at any ``sanity_n``;
    the attack-based checks (PGD cannot break anything even at radius 1) run only when ``sanity_n > 0``."""
    from robkd.models import RobustModel

    class Quantise(torch.nn.Module):
        def forward(self, x):
            return torch.round(x * 4) / 4  # zero gradient almost everywhere

    masked = RobustModel(torch.nn.Sequential(Quantise(), trained_cnn), trained_cnn.meta)
    kw = {**FAST, "attacks": ["pgd-3"], "eps": [0.05]}
    full = audit(masked, masked, sanity_n=16, **kw).to_dict()["sanity"]
    codes = {f["code"] for f in full["flags"]}
    assert full["attack_checks_n"] == 16 and {"zero-gradients", "large-radius-not-broken"} <= codes
    quick = audit(masked, masked, sanity_n=0, **kw).to_dict()["sanity"]
    codes = {f["code"] for f in quick["flags"]}
    assert quick["attack_checks_n"] == 0 and "zero-gradients" in codes and "large-radius-not-broken" not in codes
    with pytest.raises(UsageError, match="sanity_n"):
        audit(masked, masked, sanity_n=-1, **kw)


def test_pyautoattack_attacks_in_an_audit_with_output_dir(trained_cnn, trained_mlp, tmp_path):
    """Regression: AutoAttack-family attacks in an audit that writes to a directory (teacher and student,
    several radii) run for each model and give the same figures as without a directory."""
    kw = {**FAST, "n": 24, "attacks": ["fgsm", "apgd-ce"], "sanity_n": 0}
    on_disk = audit(trained_cnn, trained_mlp, out_dir=tmp_path / "a", **kw).to_dict()
    in_memory = audit(trained_cnn, trained_mlp, **kw).to_dict()
    for role in ("teacher", "student"):
        assert on_disk[role]["per_radius"] == in_memory[role]["per_radius"]
        assert on_disk[role]["per_radius"][-1]["worst"]["value"] < on_disk[role]["clean"]["value"]
