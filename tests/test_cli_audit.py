"""``robkd audit`` in-process: exit codes, outputs, bad input leaves nothing, spec files, gates."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from robkd.cli.main import main
from robkd.errors import UsageError

COMMON = ["--data", "fashion-mnist-slice", "--n", "64", "--eps", "0.02,0.05", "--attacks", "fgsm,pgd-3", "--batch-size", "64"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, trained_cnn, trained_mlp):
    """A teacher (cnn) and student (mlp) saved as robkd checkpoints."""
    from robkd.models import save_model

    d = tmp_path_factory.mktemp("models")
    t = save_model(trained_cnn, d / "teacher.safetensors", provenance={"note": "test teacher"})
    s = save_model(trained_mlp, d / "student.safetensors")
    return str(t), str(s)


@pytest.fixture(scope="module")
def audited(pair, tmp_path_factory):
    """One successful CLI audit shared by several tests."""
    out = tmp_path_factory.mktemp("audit") / "out"
    code = main(["audit", *pair, *COMMON, "--out", str(out), "--gate", "student.clean >= 0.1", "--gate-on", "point"])
    return code, out


def test_audit_writes_documented_results(audited, pair):
    code, out = audited
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == "1" and data["exit_code"] == 0 and data["gates_passed"] is True
    assert data["command"][:2] == ["robkd", "audit"] and "--gate" in data["command"]
    assert data["attacks"] == ["fgsm", "pgd-3"] and data["radii"] == [0.02, 0.05]
    assert data["data"]["n"] == 64 and data["data"]["split"] == "test"
    assert data["teacher"]["model"]["file_sha256"] == hashlib.sha256(Path(pair[0]).read_bytes()).hexdigest()
    assert data["teacher"]["model"]["meta"]["provenance"]["note"] == "test teacher"
    assert data["environment"]["torch"] == importlib.metadata.version("torch")
    assert data["timings"]["total_s"] > 0
    # schema doc mentions every top-level key
    doc = (Path(__file__).resolve().parents[1] / "docs" / "results-schema.md").read_text()
    for key in data:
        assert f"`{key}`" in doc, key

    from safetensors.torch import load_file

    t = load_file(str(out / "samples.safetensors"))
    assert (out / "report.html").exists() and (out / "report.md").exists()
    # the sample indices hash recorded matches the stored indices
    assert hashlib.sha256(t["indices"].numpy().astype("<i8").tobytes()).hexdigest() == data["data"]["indices_sha256"]
    from robkd.data import eval_subset, load_dataset

    sub = eval_subset(load_dataset("fashion-mnist-slice", "test"), 64, 0)
    assert torch.equal(t["indices"], sub.indices) and torch.equal(t["labels"], sub.y)
    for role in ("teacher", "student"):
        block = data[role]
        assert block["clean"]["k"] == int(t[f"{role}.clean_correct"].sum())
        assert block["clean"]["k"] == int((t[f"{role}.clean_pred"] == t["labels"]).sum())
        prev_worst = 1.0
        for i, entry in enumerate(block["per_radius"]):
            # recount from the per-sample tensors
            assert entry["worst"]["k"] == int(t[f"{role}.robust"][i].sum())
            assert entry["after_attack"]["fgsm"]["k"] == int(t[f"{role}.robust_after.fgsm"][i].sum())
            # cumulative: non-increasing along the cascade; the last equals the worst case
            assert entry["after_attack"]["fgsm"]["k"] >= entry["after_attack"]["pgd-3"]["k"] == entry["worst"]["k"]
            assert entry["worst"]["k"] <= block["clean"]["k"]
            assert entry["worst"]["value"] <= prev_worst  # larger radius, no more robust
            prev_worst = entry["worst"]["value"]
            assert entry["worst"]["ci_low"] <= entry["worst"]["value"] <= entry["worst"]["ci_high"]
            broken = t[f"{role}.broken_by"][i]
            assert entry["broken_by"]["fgsm"] == int((broken == 0).sum())
            assert entry["misclassified_clean"] == 64 - block["clean"]["k"]
    for i, tr in enumerate(data["transfer"]):
        lost = t["teacher.robust"][i] & ~t["student.robust"][i]
        assert tr["lost"]["k"] == int(lost.sum())
        assert tr["teacher_robust"] == data["teacher"]["per_radius"][i]["worst"]["k"]


def test_refuses_to_overwrite_an_audit(audited, pair, capsys):
    _, out = audited
    before = (out / "results.json").read_bytes()
    assert main(["audit", *pair, *COMMON, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0]
    assert (out / "results.json").read_bytes() == before


def test_gate_failure_exits_1(pair, tmp_path):
    out = tmp_path / "o"
    code = main(["audit", *pair, *COMMON, "--out", str(out), "--gate", "student.clean >= 0.1",
                 "--gate", "student.worst@0.05 >= 1.5*teacher.worst@0.05 + 0.01"])
    assert code == 1
    data = json.loads((out / "results.json").read_text())
    assert [g["passed"] for g in data["gates"]] == [True, False]
    g = data["gates"][1]
    assert g["reason"].startswith("FAIL: ") and g["on"] == "lower"
    assert set(g["references"]) == {"student.worst@0.05", "teacher.worst@0.05"}
    # one metric: its exact Clopper-Pearson lower bound against the constant
    g0 = data["gates"][0]
    assert g0["method"] == "interval" and g0["compared"][0] == pytest.approx(data["student"]["clean"]["ci_low"])
    # two metrics: paired bootstrap over the audited samples; recompute the fraction independently
    assert g["method"] == "paired-bootstrap"
    from safetensors.torch import load_file

    t = load_file(str(out / "samples.safetensors"))
    s_rob, t_rob = t["student.robust"][1].double(), t["teacher.robust"][1].double()
    gen = torch.Generator().manual_seed(123)
    idx = torch.randint(0, s_rob.shape[0], (4000, s_rob.shape[0]), generator=gen)
    holds = (s_rob[idx].mean(1) >= 1.5 * t_rob[idx].mean(1) + 0.01).double().mean()
    assert g["holds_fraction"] == pytest.approx(float(holds), abs=0.03) and g["holds_fraction"] < 0.95


def _bad_inputs(pair, tmp_path):
    t, s = pair
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02this is not a pickle at all")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"GIF89a not a model at all" * 4)
    sd = _state_dict_file(pair, tmp_path)
    (tmp_path / "robkd_test_boom.py").write_text("def make(num_classes):\n    raise ValueError('no such width')\n")
    return {
        "missing file": [str(tmp_path / "nope.pt"), s, *COMMON],
        "corrupt file": [str(corrupt), s, *COMMON],
        "bad eps": [t, s, *COMMON, "--eps", "0.1,abc"],
        "negative eps": [t, s, *COMMON, "--eps", "-0.1"],
        "unknown dataset": [t, s, *COMMON, "--data", "imagenet-21k-nope"],
        "n=0": [t, s, *COMMON, "--n", "0"],
        "unknown attack": [t, s, *COMMON, "--attacks", "fgsm,nonsense-7"],
        "junk gate": [t, s, *COMMON, "--gate", "__import__('os').system('touch /tmp/x')"],
        "unknown radius in gate": [t, s, *COMMON, "--gate", "student.worst@0.3 >= 0.1"],
        "unknown attack in gate": [t, s, *COMMON, "--gate", "student.square@0.05 >= 0.1"],
        "missing student": [t],
        "bad mean": [t, s, *COMMON, "--mean", "a,b"],
        "unknown format": [str(junk), s, *COMMON],
        "unknown architecture": [str(sd), s, *COMMON, "--teacher-arch", "robkd:nope", "--mean", "0.286", "--std", "0.353"],
        "key mismatch": [str(sd), s, *COMMON, "--teacher-arch", "robkd:mlp", "--mean", "0.286", "--std", "0.353"],
        "state_dict without arch": [str(sd), s, *COMMON],
        "L2 without radii": [t, s, *[a for a in COMMON if a != "--eps" and a != "0.02,0.05"], "--norm", "L2"],
        "failing user factory": [str(sd), s, *COMMON, "--teacher-arch", "robkd_test_boom:make"],
    }


def _state_dict_file(pair, tmp_path):
    from robkd.models import load_model

    p = tmp_path / "teacher_weights.pt"
    torch.save(load_model(pair[0]).net.state_dict(), p)
    return p


BAD_CASES = ["missing file", "corrupt file", "bad eps", "negative eps", "unknown dataset", "n=0", "unknown attack",
             "junk gate", "unknown radius in gate", "unknown attack in gate", "missing student", "bad mean",
             "unknown format", "unknown architecture", "key mismatch", "state_dict without arch", "L2 without radii",
             "failing user factory"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_and_leaves_nothing(pair, tmp_path, capsys, case, monkeypatch):
    monkeypatch.chdir(tmp_path)  # user modules named by --arch are looked up in the working directory
    argv = _bad_inputs(pair, tmp_path)[case]
    out = tmp_path / "out"
    code = main(["audit", *argv, "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robkd audit: error:"), err
    assert WHY.get(case, "") in err[0], err[0]
    assert not out.exists()


#: what the one error line must say for some of the cases
WHY = {"unknown architecture": "robkd:nope", "key mismatch": "missing", "state_dict without arch": "--arch",
       "L2 without radii": "--eps", "failing user factory": "no such width", "unknown format": "junk.bin"}


def test_incompatible_pair_exits_2(pair, tmp_path, capsys):
    from robkd.models import build_model, save_model

    five = build_model("robkd:mlp", input_shape=(1, 28, 28), num_classes=5, arch_kwargs={"hidden": [8]})
    p5 = save_model(five, tmp_path / "five.safetensors")
    cifar = build_model("robkd:mlp", input_shape=(3, 32, 32), num_classes=10, arch_kwargs={"hidden": [8]})
    p3 = save_model(cifar, tmp_path / "cifar.safetensors")
    for other, needle in ((p5, "class"), (p3, "shape")):
        out = tmp_path / "out"
        assert main(["audit", pair[0], str(other), *COMMON, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert not out.exists()


def test_spec_file_and_flag_precedence(pair, tmp_path, capsys):
    spec = tmp_path / "a.toml"
    spec.write_text(
        f'teacher = "{pair[0]}"\nstudent = "{pair[1]}"\ndata = "fashion-mnist-slice"\nn = 40\nseed = 3\n'
        'eps = [0.03]\nattacks = ["fgsm"]\nbatch-size = 64\ngates = ["student.clean >= 0.99"]\ngate_on = "point"\n'
    )
    out = tmp_path / "o"
    # flags override the spec: n, and the gates list (replaced, so the failing spec gate is gone)
    code = main(["audit", "--spec", str(spec), "--n", "32", "--gate", "teacher.clean >= 0.1", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["n"] == 32 and data["data"]["n"] == 32  # flag
    assert data["config"]["seed"] == 3 and data["radii"] == [0.03] and data["attacks"] == ["fgsm"]  # file
    assert [g["gate"] for g in data["gates"]] == ["teacher.clean >= 0.1"]
    # without the flag, the spec's gate applies and fails
    out2 = tmp_path / "o2"
    assert main(["audit", "--spec", str(spec), "--out", str(out2)]) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('data = "fashion-mnist-slice"\nradius = 0.1\n')
    out3 = tmp_path / "o3"
    capsys.readouterr()
    assert main(["audit", *pair, "--spec", str(bad), "--out", str(out3)]) == 2
    assert "unknown key" in capsys.readouterr().err and not out3.exists()


def test_self_audit_transfer_is_perfect(pair, tmp_path):
    out = tmp_path / "self"
    assert main(["audit", pair[0], pair[0], *COMMON, "--out", str(out), "--gate", "transfer.ratio@0.05 >= 1", "--gate-on", "point"]) == 0
    data = json.loads((out / "results.json").read_text())
    for tr in data["transfer"]:
        assert tr["lost"]["k"] == 0 and tr["gained"]["k"] == 0
        if tr["teacher_robust"]:
            assert tr["ratio"]["value"] == 1.0
            assert tr["ratio"]["ci_low"] < 1.0 < tr["ratio"]["ci_high"]
    assert data["teacher"]["per_radius"] == data["student"]["per_radius"]
    # judged on 95% confidence (the default): the teacher and student share their samples, so a paired
    # judgement passes a perfect copy (independent intervals would fail it: 0.9 * upper > lower)
    out2 = tmp_path / "self-lower"
    gates = ["student.worst@0.05 >= 0.9*teacher.worst@0.05", "transfer.ratio@0.05 >= 0.99",
             "student.clean - teacher.clean >= 0"]
    assert main(["audit", pair[0], pair[0], *COMMON, "--out", str(out2), *[a for g in gates for a in ("--gate", g)]]) == 0
    data2 = json.loads((out2 / "results.json").read_text())
    assert all(g["passed"] and g["method"] == "paired-bootstrap" and g["holds_fraction"] == 1.0 for g in data2["gates"])
    w = data2["student"]["per_radius"][1]["worst"]
    assert w["ci_low"] < 0.9 * w["ci_high"]  # the unpaired rule would have failed the first gate


def test_json_output(pair, tmp_path, capsys):
    code = main(["audit", *pair, "--data", "fashion-mnist-slice", "--n", "16", "--eps", "0.05", "--attacks", "fgsm", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["data"]["n"] == 16 and data["config"]["out"] is None


def test_strict_mode_exit_code(pair, tmp_path, capsys):
    import importlib.util

    out = tmp_path / "strict"
    code = main(["audit", *pair, *COMMON, "--out", str(out), "--strict"])
    if importlib.util.find_spec("robkd.analysis.sanity") is None:
        # without the sanity checks --strict cannot be honoured: bad input, nothing written
        assert code == 2 and not out.exists()
        assert "sanity" in capsys.readouterr().err
    else:
        data = json.loads((out / "results.json").read_text())
        assert data["sanity"]["checked"] is True and data["sanity"]["strict"] is True
        assert code == (3 if data["sanity"]["flags"] else 0) == data["exit_code"]


def test_state_dict_with_arch_takes_shape_and_classes_from_the_data(pair, tmp_path, monkeypatch):
    """The README's second quickstart: a plain state_dict, --arch and --mean/--std, no --input-shape."""
    sd = _state_dict_file(pair, tmp_path)
    out_sd, out_ck = tmp_path / "sd", tmp_path / "ck"
    flags = [*COMMON, "--gate-on", "point", "--no-report"]
    assert main(["audit", str(sd), pair[1], *flags, "--teacher-arch", "robkd:cnn_small", "--mean", "0.286",
                 "--std", "0.353", "--out", str(out_sd)]) == 0
    assert main(["audit", pair[0], pair[1], *flags, "--out", str(out_ck)]) == 0
    a, b = (json.loads((o / "results.json").read_text()) for o in (out_sd, out_ck))
    assert a["teacher"]["model"]["meta"]["input_shape"] == [1, 28, 28] and a["teacher"]["model"]["meta"]["num_classes"] == 10
    assert a["teacher"]["per_radius"] == b["teacher"]["per_radius"] and a["teacher"]["clean"] == b["teacher"]["clean"]
    # and a user factory in the working directory (the console script does not put it on sys.path)
    (tmp_path / "robkd_test_arch.py").write_text(
        "from robkd.models import create_model\n"
        "def make(num_classes, in_chans, img_size):\n"
        "    return create_model('robkd:cnn_small', num_classes=num_classes, in_chans=in_chans, img_size=img_size)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "nowhere"))  # sys.path without the working directory
    import sys

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    out_u = tmp_path / "user"
    assert main(["audit", str(sd), pair[1], *flags, "--teacher-arch", "robkd_test_arch:make", "--mean", "0.286",
                 "--std", "0.353", "--out", str(out_u)]) == 0
    assert json.loads((out_u / "results.json").read_text())["teacher"]["per_radius"] == b["teacher"]["per_radius"]


def test_attack_names_are_case_insensitive(pair, tmp_path):
    out = tmp_path / "o"
    args = [a if a != "fgsm,pgd-3" else "FGSM,PGD-3" for a in COMMON]
    assert main(["audit", *pair, *args, "--out", str(out), "--no-report", "--gate", "student.fgsm@0.05 >= 0"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["attacks"] == ["fgsm", "pgd-3"] and data["gates_passed"]


def test_audit_of_batchnorm_models(pair, tmp_path):
    """BatchNorm's 0-dim num_batches_tracked buffer is hashed like any other weight (it crashed the audit)."""
    from robkd.models import build_model, save_model

    bn = build_model("robkd:cnn_medium", input_shape=(1, 28, 28), num_classes=10, mean=(0.286,), std=(0.353,),
                     dataset="fashion-mnist")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())
    p = save_model(bn, tmp_path / "bn.safetensors")
    out = tmp_path / "o"
    assert main(["audit", pair[0], str(p), *COMMON, "--no-report", "--sanity-n", "0", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["student"]["model"]["meta"]["arch"] == "robkd:cnn_medium"


def test_shared_normalisation_flags_fill_in_and_never_override(pair, tmp_path, capsys):
    """--mean/--std apply to both models: they fill in a state_dict's normalisation and leave a checkpoint's
    own alone (they used to re-normalise it silently); load_model refuses a flag contradicting its file."""
    from robkd.models import load_model

    sd = _state_dict_file(pair, tmp_path)
    out = tmp_path / "o"
    assert main(["audit", str(sd), pair[1], *COMMON, "--no-report", "--sanity-n", "0", "--teacher-arch",
                 "robkd:cnn_small", "--mean", "0.5", "--std", "0.25", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    own = load_model(pair[1]).meta
    assert res["teacher"]["model"]["meta"]["mean"] == [0.5] and res["teacher"]["model"]["meta"]["std"] == [0.25]
    assert res["student"]["model"]["meta"]["mean"] == (list(own.mean) if own.mean is not None else None)
    with pytest.raises(UsageError, match="the flags say 0.5"):
        load_model(pair[0], mean=(0.5,), std=(0.353,))
    assert load_model(pair[0], mean=(0.286,), std=(0.353,)).meta.mean == pytest.approx((0.286,))  # agreeing is fine
