"""``robkd certify`` in-process: writes certify.json, prints a table, exits 2 on bad input."""

from __future__ import annotations

import json

import pytest
import torch

from robkd.cli.main import main
from robkd.models import build_model, save_model


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory, trained_mlp):
    path = tmp_path_factory.mktemp("certify") / "mlp.safetensors"
    save_model(trained_mlp, path)
    return path


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_certify_cli_writes_json(mlp_file, tmp_path, method, capsys):
    out = tmp_path / "out"
    rc = main(["certify", str(mlp_file), "--method", method, "--eps", "0.001,0.01", "--data", "fashion-mnist-slice",
               "--n", "20", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "certify.json").read_text())
    assert doc["method"] == method and doc["n"] == 20 and doc["radii"] == [0.001, 0.01]
    accs = [r["certified_accuracy"] for r in doc["results"]]
    assert accs[0] >= accs[1]  # certification can only get harder with the radius
    assert len(doc["results"][0]["per_sample"]["certified"]) == 20
    assert "certified acc." in capsys.readouterr().out


def test_certify_cli_matches_library(mlp_file, tmp_path, trained_mlp, fmnist_test):
    from robkd.bounds import certify
    from robkd.data import eval_subset

    out = tmp_path / "o"
    assert main(["certify", str(mlp_file), "--eps", "0.01", "--data", "fashion-mnist-slice", "--n", "15",
                 "--seed", "3", "--out", str(out), "--json"]) == 0
    doc = json.loads((out / "certify.json").read_text())
    sub = eval_subset(fmnist_test, 15, 3)
    res = certify(trained_mlp, sub.float_x(), sub.y, 0.01)
    assert doc["results"][0]["per_sample"]["certified"] == res.certified.tolist()
    assert doc["sample_indices"] == sub.indices.tolist()


def test_certify_cli_milp(tmp_path):
    torch.manual_seed(0)
    m = build_model("robkd:mlp", input_shape=(1, 28, 28), num_classes=10, dataset="fashion-mnist", arch_kwargs={"hidden": [8]})
    path = tmp_path / "tiny.safetensors"
    save_model(m, path)
    out = tmp_path / "milp"
    assert main(["certify", str(path), "--method", "milp", "--eps", "0.001", "--n", "3", "--data", "fashion-mnist-slice",
                 "--time-limit", "10", "--out", str(out)]) == 0
    doc = json.loads((out / "certify.json").read_text())
    r = doc["results"][0]
    assert r["certified"] + r["falsified"] + r["unknown"] == 3  # issue 16: one schema, "verified" is "certified"


@pytest.mark.parametrize(
    "extra",
    [
        ["--eps", "-1"],
        ["--eps", "0.1", "--method", "nope"],
        ["--eps", "0.1", "--batch-size", "0"],
        ["--eps", "0.1", "--method", "milp", "--norm", "L2"],
        ["--eps", "0.1", "--method", "smoothing"],
        ["--eps", "0.1", "--data", "no-such-dataset"],
        ["--eps", "0.1", "--n", "0"],
        ["--eps", "0.1", "--linear-region-max", "0.5"],
        ["--eps", "0.1", "--linear-region-radius", "--linear-region-max", "-1"],
        ["--eps", "0.1", "--linear-region-radius", "--linear-region-max", "0.1", "--linear-region-tol", "0.2"],
    ],
)
def test_certify_cli_bad_inputs_exit_2(mlp_file, tmp_path, extra):
    args = ["certify", str(mlp_file), "--data", "fashion-mnist-slice", "--n", "5", "--out", str(tmp_path / "x")]
    # later flags win in argparse
    assert main(args + extra) == 2
    assert not (tmp_path / "x" / "certify.json").exists()


def test_certify_cli_missing_model_exit_2(tmp_path):
    assert main(["certify", str(tmp_path / "missing.safetensors"), "--eps", "0.1", "--out", str(tmp_path / "x")]) == 2


def test_certify_cli_smoothing(mlp_file, tmp_path):
    out = tmp_path / "s"
    assert main(["certify", str(mlp_file), "--method", "smoothing", "--sigma", "0.25", "--n0", "10", "--mc-n", "100",
                 "--eps", "0.1,0.5", "--data", "fashion-mnist-slice", "--n", "4", "--out", str(out)]) == 0
    doc = json.loads((out / "certify.json").read_text())
    assert doc["norm"] == "L2" and len(doc["results"]) == 2
    assert doc["results"][0]["certified_accuracy"] >= doc["results"][1]["certified_accuracy"]


def test_certify_cli_smoothing_needs_explicit_l2_radii(mlp_file, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["certify", str(mlp_file), "--method", "smoothing", "--sigma", "0.25", "--data", "fashion-mnist-slice",
                 "--n", "4", "--out", str(out)]) == 2
    assert "L2 radii" in capsys.readouterr().err and not out.exists()


def test_certify_cli_l2_needs_explicit_radii(mlp_file, tmp_path, capsys):
    """The dataset's usual radius is an Linf radius: it is never used silently as an L2 one."""
    out = tmp_path / "l2"
    assert main(["certify", str(mlp_file), "--method", "crown", "--norm", "L2", "--data", "fashion-mnist-slice",
                 "--n", "4", "--out", str(out)]) == 2
    assert "--eps" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_certify_cli_linear_region_radius(mlp_file, tmp_path, trained_mlp, fmnist_test, norm, capsys):
    import math

    from robkd.bounds import linear_region_radius
    from robkd.data import eval_subset

    out = tmp_path / "lr"
    assert main(["certify", str(mlp_file), "--eps", "0.001", "--norm", norm, "--data", "fashion-mnist-slice", "--n", "6",
                 "--linear-region-radius", "--out", str(out)]) == 0
    assert "linear-region radius" in capsys.readouterr().out
    block = json.loads((out / "certify.json").read_text())["linear_region_radius"]
    hi = 1.0 if norm == "Linf" else math.sqrt(784)  # the cap: the ball covers the whole input cube
    assert block["hi"] == pytest.approx(hi) and block["tol"] == pytest.approx(1e-4 * hi) and block["norm"] == norm
    r = block["per_sample"]
    assert len(r) == 6 and block["n"] == 6
    assert block["mean"] == pytest.approx(sum(r) / 6)
    assert block["median"] == pytest.approx(float(torch.tensor(r, dtype=torch.float64).median()))
    assert block["capped"] == sum(v >= hi * (1 - 1e-6) for v in r)
    sub = eval_subset(fmnist_test, 6, 0)
    lib = linear_region_radius(trained_mlp, sub.float_x(), norm=norm)
    assert r == pytest.approx(lib.tolist())
    # the reported radius is inside one linear region by the bounds, and the per-radius results are unchanged
    from robkd.bounds import certify

    for i in range(6):
        res = certify(trained_mlp, sub.float_x()[i : i + 1], sub.y[i : i + 1], r[i], norm=norm, early_exit=False)
        assert bool(res.linear_region.all())


def test_certify_cli_without_flag_has_null_linear_region_radius(mlp_file, tmp_path):
    out = tmp_path / "nolr"
    assert main(["certify", str(mlp_file), "--eps", "0.001", "--data", "fashion-mnist-slice", "--n", "3", "--out", str(out)]) == 0
    assert json.loads((out / "certify.json").read_text())["linear_region_radius"] is None


def test_audit_certify_crown_reports_linear_region_radius(mlp_file, tmp_path, trained_mlp, fmnist_test):
    from safetensors.torch import load_file

    from robkd.bounds import linear_region_radius
    from robkd.data import eval_subset

    out = tmp_path / "audit"
    assert main(["audit", str(mlp_file), str(mlp_file), "--data", "fashion-mnist-slice", "--n", "8", "--eps", "0.005",
                 "--attacks", "fgsm", "--certify", "crown", "--linear-region-radius", "--sanity-n", "0", "--no-report",
                 "--out", str(out), "--json"]) == 0
    data = json.loads((out / "results.json").read_text())
    t = load_file(str(out / "samples.safetensors"))
    assert data["config"]["linear_region_radius"] is True
    lib = linear_region_radius(trained_mlp, eval_subset(fmnist_test, 8, 0).float_x(), method="crown")
    for role in ("teacher", "student"):
        block = data[role]["certification"]["linear_region_radius"]
        r = t[f"{role}.linear_region_radius"]
        assert torch.allclose(r, lib)
        assert block["n"] == 8 and block["hi"] == 1.0 and block["method"] == "crown"
        assert block["mean"] == pytest.approx(float(r.double().mean())) and block["capped"] == int((r >= 1.0).sum())
    # needs --certify
    assert main(["audit", str(mlp_file), str(mlp_file), "--data", "fashion-mnist-slice", "--n", "8", "--eps", "0.005",
                 "--linear-region-radius", "--out", str(tmp_path / "bad")]) == 2
