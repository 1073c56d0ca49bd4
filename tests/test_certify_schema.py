"""One certify.json schema for every method (issue 16; docs/certify-schema.md)."""

from __future__ import annotations

import copy
import json

import pytest

from robkd.bounds.records import fraction
from robkd.cli.main import main
from robkd.models import load_model, save_model
from robkd.models.identity import model_sha256
from robkd.report.schema.certify import SCHEMA, CertifyJsonError, certify_errors, check_certify
from robkd.utils.stats import clopper_pearson

METHOD_ARGS = {
    "ibp": ["--method", "ibp"],
    "crown": ["--method", "crown"],
    "alpha-crown": ["--method", "alpha-crown", "--alpha-steps", "2"],
    "milp": ["--method", "milp", "--time-limit", "5"],
    "smoothing": ["--method", "smoothing", "--sigma", "0.25", "--n0", "10", "--mc-n", "60"],
    "budget": ["--budget", "5s,1GB"],
}


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory, trained_mlp):
    path = tmp_path_factory.mktemp("schema") / "mlp.safetensors"
    save_model(trained_mlp, path)
    return path


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_every_method_writes_the_one_schema(mlp_file, tmp_path, method, capsys):
    out = tmp_path / "o"
    eps = "0.25,0.5" if method == "smoothing" else "0.002,0.02"
    argv = ["certify", str(mlp_file), "--data", "fashion-mnist-slice", "--n", "3", "--eps", eps, "--out", str(out)]
    argv += METHOD_ARGS[method]
    assert main(argv) == 0
    doc = json.loads((out / "certify.json").read_text())
    assert certify_errors(doc) == []
    assert doc["schema"] == SCHEMA and doc["method"] == method
    assert doc["command"] == ["robkd"] + argv  # the actual command line, not the command's name
    assert doc["model_sha256"] == model_sha256(load_model(str(mlp_file)))
    assert doc["n"] == 3 and all(isinstance(r, float) for r in doc["radii"])
    for r in doc["results"]:
        k = r["certified"]
        assert r["certified_accuracy"] == k / 3  # exactly, e.g. 0.6666666666666666, never 0.6666666865
        lo, hi = clopper_pearson(k, 3, 0.95)
        assert r["certified_fraction"] == {"k": k, "n": 3, "value": k / 3, "ci_low": lo, "ci_high": hi}
        assert len(r["per_sample"]["status"]) == 3 and len(r["per_sample"]["decided_by"]) == 3
    text = capsys.readouterr().out
    assert "certified acc." in text and "%" in text and "[" in text  # percentages with 95% intervals


def test_fraction_is_exact_from_counts():
    f = fraction(2, 3)
    assert f["value"] == 2 / 3 and repr(f["value"]) == "0.6666666666666666"
    assert (f["ci_low"], f["ci_high"]) == clopper_pearson(2, 3, 0.95)
    assert fraction(0, 0)["value"] is None


def _valid_doc(tmp_path, mlp_file) -> dict:
    out = tmp_path / "v"
    assert main(["certify", str(mlp_file), "--data", "fashion-mnist-slice", "--n", "3", "--eps", "0.01", "--method",
                 "ibp", "--out", str(out)]) == 0
    return json.loads((out / "certify.json").read_text())


def test_validator_rejects_broken_documents(tmp_path, mlp_file):
    doc = _valid_doc(tmp_path, mlp_file)
    check_certify(doc)
    cases = []
    d = copy.deepcopy(doc)
    d["radii"] = ["0.01"]  # radii as strings (the old --method milp)
    cases.append(d)
    d = copy.deepcopy(doc)
    del d["n"]
    cases.append(d)
    d = copy.deepcopy(doc)
    d["results"][0]["certified_accuracy"] = 0.6666666865  # a float32 round-off, not k/n
    cases.append(d)
    d = copy.deepcopy(doc)
    d["results"][0]["unknown"] += 1  # counts no longer add up
    cases.append(d)
    d = copy.deepcopy(doc)
    d["results"][0]["per_sample"] = [{"status": "certified"}] * 3  # a list of objects
    cases.append(d)
    d = copy.deepcopy(doc)
    d["command"] = "certify"
    cases.append(d)
    d = copy.deepcopy(doc)
    d["surprise"] = 1
    cases.append(d)
    d = copy.deepcopy(doc)
    d["results"][0]["per_sample"]["status"][0] = "verified"
    cases.append(d)
    for bad in cases:
        assert certify_errors(bad), bad
        with pytest.raises(CertifyJsonError):
            check_certify(bad)
    assert certify_errors([]) == ["certify.json: must be a JSON object"]
