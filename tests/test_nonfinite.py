"""Non-finite outputs are never a prediction: a NaN model can never pass a gate (issue 12)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from robkd.utils.logits import NON_FINITE, correct, finite_rows, predict


class _Poisoned(nn.Module):
    """Wraps a model; rows selected by ``where(x)`` get NaN (or +inf on class 0) logits."""

    def __init__(self, net: nn.Module, value: float = float("nan"), where=None) -> None:
        super().__init__()
        self.net = net
        self.value = value
        self.where = where

    def forward(self, x):
        out = self.net(x)
        rows = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if self.where is None else self.where(x)
        bad = out.clone()
        if self.value != self.value:  # NaN: the whole row
            bad[rows] = float("nan")
        else:
            bad[rows, 0] = self.value
        return torch.where(rows.view(-1, 1), bad, out)


def test_predict_marks_every_non_finite_row():
    logits = torch.tensor([[0.1, 2.0, -1.0], [float("nan")] * 3, [float("inf"), 0.0, 0.0],
                           [0.0, float("-inf"), 1.0], [float("nan"), 5.0, 0.0]])
    assert finite_rows(logits).tolist() == [True, False, False, False, False]
    assert predict(logits).tolist() == [1, NON_FINITE, NON_FINITE, NON_FINITE, NON_FINITE]
    # torch.argmax alone reads an all-NaN row as class 0: the defect this policy closes
    assert int(logits[1:2].argmax(1)) == 0
    y = torch.tensor([1, 0, 0, 2, 1])
    assert correct(logits, y).tolist() == [True, False, False, False, False]


def test_attack_success_and_recheck_count_non_finite_as_broken(trained_cnn, fmnist_test):
    from robkd.attacks import verify_adversarial
    from robkd.attacks.base import is_success

    x, y = fmnist_test.float_x(slice(0, 32)), fmnist_test.y[:32]
    logits = torch.full((2, 10), float("nan"))
    assert is_success(logits, torch.tensor([0, 3]), None).all()
    assert is_success(logits, torch.tensor([0, 3]), torch.tensor([1, 1])).all()
    nan_model = _Poisoned(trained_cnn).eval()
    ok = verify_adversarial(nan_model, x, x.clone(), y, "Linf", 0.0)
    assert ok.all()  # every NaN output is a (valid, zero-norm) adversarial example


def test_suite_never_counts_a_nan_model_correct(trained_cnn, fmnist_test):
    from robkd.attacks import Suite

    x, y = fmnist_test.float_x(slice(0, 64)), fmnist_test.y[:64]
    res = Suite(["fgsm", "pgd-3"], "Linf", progress=False).run(_Poisoned(trained_cnn).eval(), x, y, [0.0, 0.05])
    assert res.clean_accuracy() == 0.0 and all(a == 0.0 for a in res.robust_accuracy())


def test_smoothing_votes_of_non_finite_draws_count_for_no_class(trained_cnn, fmnist_test):
    from robkd.bounds.smoothing import certify_smoothing

    x, y = fmnist_test.float_x(slice(0, 4)), fmnist_test.y[:4]
    res = certify_smoothing(_Poisoned(trained_cnn).eval(), x, y, sigma=0.25, n0=16, n=64, alpha=0.01, seed=0)
    assert res.certified_accuracy(0.0) == 0.0


def test_certify_never_certifies_a_non_finite_sample(trained_mlp, fmnist_test):
    """An infinite logit on class 0 makes every margin bound of a class-0 sample +inf: plain argmax and
    bound logic would certify it; the non-finite policy never does."""
    import copy

    from robkd.bounds import certify

    keep = (fmnist_test.y == 0).nonzero().flatten()[:8]
    x, y = fmnist_test.float_x(keep), fmnist_test.y[keep]
    broken = copy.deepcopy(trained_mlp).eval()
    last = [m for m in broken.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias[0] = float("inf")
        assert (broken(x).argmax(1) == 0).all()  # what argmax alone would count correct
    for method in ("ibp", "crown"):
        res = certify(broken, x, y, 0.01, norm="Linf", method=method)
        assert not res.certified.any() and not res.clean_correct.any()


@pytest.fixture()
def zeros_npz(tmp_path, fmnist_test):
    """Only samples labelled 0: argmax of an all-NaN row (class 0) would be 'correct' on every one."""
    keep = (fmnist_test.y == 0).nonzero().flatten()[:24]
    p = tmp_path / "zeros.npz"
    np.savez(p, x=fmnist_test.x[keep].numpy(), y=fmnist_test.y[keep].numpy().astype(np.int64))
    return p


def _nan_student_file(tmp_path, trained_mlp):
    """A robkd checkpoint of the student whose weights are all NaN (what a diverged repair saves)."""
    from robkd.models import save_model

    import copy

    broken = copy.deepcopy(trained_mlp)
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(float("nan"))
    return save_model(broken, tmp_path / "nan_student.safetensors")


@pytest.mark.parametrize("strict", [False, True])
def test_a_nan_student_never_passes_a_gate(tmp_path, trained_cnn, trained_mlp, zeros_npz, strict, capsys):
    from robkd.cli.main import main
    from robkd.models import save_model

    t = save_model(trained_cnn, tmp_path / "teacher.safetensors")
    s = _nan_student_file(tmp_path, trained_mlp)
    out = tmp_path / "out"
    argv = ["audit", str(t), str(s), "--data", str(zeros_npz), "--n", "24", "--eps", "0.1", "--attacks", "fgsm",
            "--gate", "student.worst@0.1 >= 0.8", "--gate", "student.clean >= 0.5", "--gate-on", "point",
            "--sanity-n", "0", "--out", str(out)] + (["--strict"] if strict else [])
    code = main(argv)
    assert code == (3 if strict else 1)
    data = json.loads((out / "results.json").read_text())
    assert data["student"]["clean"]["k"] == 0 and data["student"]["per_radius"][0]["worst"]["k"] == 0
    assert data["student"]["non_finite"] == {"clean": 24, "adversarial": 0}
    assert data["teacher"]["non_finite"] == {"clean": 0, "adversarial": 0}
    assert not data["gates_passed"]
    flags = [f for f in data["sanity"]["flags"] if f["code"] == "non-finite-outputs"]
    assert len(flags) == 1 and flags[0]["model"] == "student" and "24 clean" in flags[0]["message"]


def test_api_counts_adversarial_non_finite_outputs(trained_cnn, fmnist_test):
    """A student finite on clean inputs but NaN away from them: robust nowhere, and counted."""
    import robkd

    clean_x = fmnist_test.float_x(slice(0, 1000))

    class _NanOffData(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.meta = getattr(net, "meta", None)

        def forward(self, x):
            out = self.net(x)
            # finite exactly on the dataset's pixel grid (multiples of 1/255), NaN elsewhere
            off = ((x * 255 - (x * 255).round()).abs() > 1e-3).flatten(1).any(1)
            return torch.where(off.view(-1, 1), torch.full_like(out, float("nan")), out)

    student = _NanOffData(trained_cnn)
    res = robkd.audit(trained_cnn, student, data="fashion-mnist-slice", n=32, eps=[0.05], attacks=["fgsm"],
                      sanity_n=0)
    d = res.to_dict()
    assert d["student"]["clean"]["k"] == d["teacher"]["clean"]["k"] > 0
    assert d["student"]["per_radius"][0]["worst"]["k"] == 0
    assert d["student"]["non_finite"]["clean"] == 0 and d["student"]["non_finite"]["adversarial"] > 0
    assert any(f["code"] == "non-finite-outputs" for f in d["sanity"]["flags"])
    del clean_x
