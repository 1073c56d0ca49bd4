"""The transfer attack (issue 17, part 1): each model attacked with the other's adversarial examples.

A student that masks its gradients (a rounding input layer in front of a copy of the robust teacher: its
input gradient is zero, its function the teacher's on 8-bit images) resists its own PGD but falls to the
teacher's examples and is flagged; a plain pair raises no flag.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import robkd
from robkd.attacks import make_attack
from robkd.attacks.suite_result import CLEAN_WRONG, ROBUST, SuiteResult
from robkd.attacks.transfer import TRANSFER, TransferOutcome, fold_transfer
from robkd.errors import UsageError
from robkd.types import Norm
from helpers import Quantised

ZOO = Path(__file__).resolve().parents[1] / "robkd" / "zoo"
FAST = dict(data="fashion-mnist-slice", n=80, eps=[0.05, 0.1], batch_size=80, sanity_n=0)


@pytest.fixture(scope="module")
def teacher():
    from robkd.models import load_model

    return load_model(ZOO / "teacher.safetensors")


def test_gradient_masked_student_falls_to_the_teachers_examples_and_is_flagged(teacher, tmp_path):
    student = Quantised(copy.deepcopy(teacher), levels=255).eval()  # rounds the [0,1] image, then the teacher normalises it
    res = robkd.audit(teacher, student, attacks=["pgd-10", TRANSFER], strict=True, out_dir=tmp_path / "a", **FAST)
    d, t = res.to_dict(), res.tensors
    n = d["data"]["n"]
    row = d["student"]["per_radius"][1]
    own = row["after_attack"]["pgd-10"]["k"]
    worst = row["worst"]["k"]
    teacher_worst = d["teacher"]["per_radius"][1]["worst"]["k"]
    # its own PGD finds (almost) nothing: the student looks more robust than the teacher it copies ...
    assert own >= teacher_worst + 5
    # ... but the teacher's examples break it: with them it is exactly as robust as the teacher (same function)
    assert worst < own and abs(worst - teacher_worst) <= 2
    direction = d["transfer_attack"]["directions"]["teacher_to_student"]
    r1 = direction["per_radius"][1]
    assert r1["reused_broken"] > 0 and r1["broken"] == own - worst == row["broken_by"][TRANSFER]
    assert r1["robust_own"]["k"] == own and r1["robust_with_transfer"]["k"] == worst
    flags = [f for f in d["sanity"]["flags"] if f["code"] == "transfer-beats-white-box"]
    assert [f["model"] for f in flags] == ["student"] and flags[0]["value"] * n > max(2, 0.02 * n)
    assert res.exit_code == 3  # the flag fails --strict
    # every sample the transfer attack broke: its kept example is inside the ball around the same clean image,
    # in [0, 1] and misclassified by the student (recomputed here, independently of the audit's re-check)
    from robkd.data import eval_subset, load_dataset

    sub = eval_subset(load_dataset("fashion-mnist-slice", "test"), n, 0)
    x, y = sub.float_x(), sub.y
    broken = t["transfer_attack.teacher_to_student.broken"]
    assert broken.shape == (2, n) and int(broken[1].sum()) == r1["broken"]
    rows = broken[1].nonzero().flatten()
    xa = t["student.x_adv"][rows].float()
    assert float((xa - x[rows]).abs().flatten(1).max()) <= 0.1 + 1e-6
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    with torch.no_grad():
        assert (student(xa).argmax(1) != y[rows]).all()
    assert all(t["student.broken_by"][1][rows] == d["attacks"].index(TRANSFER))
    # the report shows the transfer section and the warning
    from robkd.report import render

    render(d, tmp_path / "a", formats=["md"])
    text = (tmp_path / "a" / "report.md").read_text()
    assert "Transfer attacks" in text and "Gradient masking" in text


def test_plain_pair_raises_no_flag(teacher):
    from robkd.models import load_model

    student = load_model(ZOO / "kdiga_student.safetensors")
    res = robkd.audit(teacher, student, attacks=["pgd-10", TRANSFER], **FAST)
    d = res.to_dict()
    assert not [f for f in d["sanity"]["flags"] if f["code"] == "transfer-beats-white-box"]
    assert set(d["transfer_attack"]["directions"]) == {"teacher_to_student", "student_to_teacher"}
    for direction in d["transfer_attack"]["directions"].values():
        for r in direction["per_radius"]:
            assert r["broken"] <= max(2, 0.02 * d["data"]["n"])
            assert r["attacked"] == r["reused"] + r["pgd"]
    assert d["cascade_order"][-1] == TRANSFER


def _suite(broken_by: list[list[int]], adv_radius: list[float], x_adv: torch.Tensor) -> SuiteResult:
    bb = torch.tensor(broken_by)
    return SuiteResult(attacks=["fgsm", "pgd-5"], order=["fgsm", "pgd-5"], radii=[0.1, 0.2], norm=Norm.LINF,
                       clean_correct=(bb[0] != CLEAN_WRONG), broken_by=bb, x_adv=x_adv,
                       adv_radius=torch.tensor(adv_radius), done={("fgsm", 0.1), ("fgsm", 0.2), ("pgd-5", 0.1), ("pgd-5", 0.2)})


def test_fold_inserts_the_attack_and_keeps_the_smallest_radius_example():
    # samples: 0 robust everywhere; 1 broken by pgd-5 at 0.2 only; 2 misclassified clean; 3 broken by fgsm at 0.1
    x = torch.zeros(4, 1, 2, 2)
    suite = _suite([[ROBUST, ROBUST, CLEAN_WRONG, 0], [ROBUST, 1, CLEAN_WRONG, 0]], [float("nan"), 0.2, float("nan"), 0.1],
                   x.clone())
    # the transfer attack broke sample 0 at 0.2 and sample 1 already at 0.1
    broken = torch.tensor([[False, True, False, False], [True, True, False, False]])
    rows = torch.tensor([0, 1])
    t = TransferOutcome("teacher", "student", [0.1, 0.2], 20, broken,
                        torch.tensor([0.2, 0.1, float("nan"), float("nan")]), rows, torch.ones(2, 1, 2, 2) * 0.5, [{}, {}])
    folded = fold_transfer(suite, t, position=1)  # attacks = [fgsm, transfer, pgd-5]
    assert folded.attacks == ["fgsm", TRANSFER, "pgd-5"] and folded.order == ["fgsm", "pgd-5", TRANSFER]
    # pgd-5's code moves from 1 to 2; the transfer code is 1 where only it broke the sample
    assert folded.broken_by.tolist() == [[ROBUST, 1, CLEAN_WRONG, 0], [1, 2, CLEAN_WRONG, 0]]
    # sample 1's kept example is now the transfer one (radius 0.1 < 0.2), sample 0 gets its first
    assert folded.adv_radius[:2].tolist() == pytest.approx([0.2, 0.1])
    assert float(folded.x_adv[0].max()) == 0.5 and float(folded.x_adv[1].max()) == 0.5
    assert float(folded.x_adv[3].max()) == 0.0
    assert folded.robust_accuracy() == [0.25, 0.0] and folded.complete
    assert float(suite.x_adv.max()) == 0.0  # the original is untouched
    assert suite.attacks == ["fgsm", "pgd-5"]
    with pytest.raises(UsageError):
        fold_transfer(suite, t, position=5)


def test_transfer_is_not_a_standalone_attack(teacher):
    with pytest.raises(UsageError, match="not a stand-alone attack"):
        make_attack(TRANSFER, "Linf", 0.1)
    with pytest.raises(UsageError, match="at least one attack"):
        robkd.audit(teacher, teacher, attacks=[TRANSFER], **FAST)
    with pytest.raises(UsageError, match="teacher and a student"):
        robkd.evaluate(teacher, "fashion-mnist-slice", eps=[0.1], attacks=["pgd-5", TRANSFER], n=10)
