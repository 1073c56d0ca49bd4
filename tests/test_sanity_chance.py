"""The near-chance clean-accuracy sanity flag: its rule at hand-derived boundaries, and a mis-normalised model
flagged end to end (results.json, terminal summary, report, --strict exit 3)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from robkd.analysis.sanity import check_clean_accuracy, near_chance_level, run_sanity_checks
from robkd.errors import UsageError

CODE = "near-chance-clean-accuracy"


def _hits(k: int, n: int) -> torch.Tensor:
    return torch.arange(n) < k


def test_near_chance_level_is_a_tenth_of_the_way_from_chance_to_perfect():
    assert near_chance_level(10) == pytest.approx(0.19)
    assert near_chance_level(2) == pytest.approx(0.55)
    assert near_chance_level(100) == pytest.approx(0.109)
    assert near_chance_level(1) == pytest.approx(1.0)


def test_the_rule_at_hand_derived_boundaries():
    """With k = 0 the one-sided 95% Clopper-Pearson upper bound is 1 - 0.05**(1/n): for 10 classes (level 0.19)
    n = 14 gives 0.1926 (not flagged: too few samples to be sure), n = 15 gives 0.1810 (flagged); for 2 classes
    (level 0.55) n = 3 gives 0.632, n = 4 gives 0.527."""
    assert 1 - 0.05 ** (1 / 14) > 0.19 > 1 - 0.05 ** (1 / 15)  # the hand derivation itself
    assert check_clean_accuracy(_hits(0, 14), 10) == []
    (flag,) = check_clean_accuracy(_hits(0, 15), 10, name="teacher")
    assert flag.code == CODE and flag.model == "teacher" and flag.value == 0.0
    assert "0/15" in flag.message and "18.1%" in flag.message and "19.0%" in flag.message
    assert check_clean_accuracy(_hits(0, 3), 2) == []
    assert [f.code for f in check_clean_accuracy(_hits(0, 4), 2)] == [CODE]


def test_chance_accuracy_is_flagged_with_enough_samples_and_a_good_model_never():
    # exactly chance (10%) on 200 samples: flagged; on 30 samples the data cannot tell
    assert [f.code for f in check_clean_accuracy(_hits(20, 200), 10)] == [CODE]
    assert check_clean_accuracy(_hits(3, 30), 10) == []
    # 30% on 200 is clearly above the 19% level; a perfect model on any number of samples is never flagged
    assert check_clean_accuracy(_hits(60, 200), 10) == []
    assert all(check_clean_accuracy(_hits(n, n), 10) == [] for n in (1, 5, 1000))
    assert check_clean_accuracy(torch.zeros(0, dtype=torch.bool), 10) == []
    # the hint names the likely causes
    (flag,) = check_clean_accuracy(_hits(20, 200), 10)
    assert "--mean/--std" in flag.suggestion and "label order" in flag.suggestion and "--data" in flag.suggestion
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(UsageError, match="num_classes"):
            check_clean_accuracy(_hits(1, 2), bad)


class _Constant(nn.Module):
    """Constant logits (class 0), but for a tiny input term so that gradients exist."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 10, dtype=x.dtype)
        out[:, 0] = 5.0
        return out + 1e-3 * x.flatten(1)[:, :10]


def test_constant_model_is_flagged_from_a_suite_result(fmnist_test, trained_cnn):
    from robkd.attacks import Suite

    idx = torch.arange(200)
    x, y = fmnist_test.float_x(idx), fmnist_test.y[idx]
    for model, flagged in ((_Constant(), True), (trained_cnn, False)):
        res = Suite(["fgsm"], "Linf", progress=False).run(model, x, y, [0.05])
        codes = [f.code for f in run_sanity_checks(model, x, y, result=res, extra=False, n=16)]
        assert (CODE in codes) is flagged
    # the number of classes is read from the model when not given; without a model it must be given
    res = Suite(["fgsm"], "Linf", progress=False).run(_Constant(), x, y, [0.05])
    assert CODE not in [f.code for f in run_sanity_checks(result=res, extra=False)]
    assert CODE in [f.code for f in run_sanity_checks(result=res, extra=False, num_classes=10)]


def _misnormalised(trained_cnn):
    """The trained CNN with a wrong recorded normalisation: its inputs are shifted far off the training range,
    so it predicts (almost) one class."""
    from robkd.models import RobustModel

    return RobustModel(trained_cnn.net, dataclasses.replace(trained_cnn.meta, mean=(3.0,), std=(0.1,)))


def test_misnormalised_model_in_the_cli_fails_strict_and_shows_the_hint(trained_cnn, trained_mlp, tmp_path, capsys,
                                                                          monkeypatch):
    from robkd.cli.main import main
    from robkd.models import save_model

    monkeypatch.setenv("COLUMNS", "400")  # the terminal tables on one line per row
    t = save_model(_misnormalised(trained_cnn), tmp_path / "teacher.safetensors")
    s = save_model(trained_mlp, tmp_path / "student.safetensors")
    out = tmp_path / "out"
    argv = ["audit", str(t), str(s), "--data", "fashion-mnist-slice", "--n", "200", "--eps", "0.05", "--attacks", "fgsm",
            "--sanity-n", "0", "--batch-size", "200", "--out", str(out)]
    assert main([*argv, "--strict"]) == 3
    terminal = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["teacher"]["clean"]["value"] < 0.15 and data["exit_code"] == 3
    flags = [f for f in data["sanity"]["flags"] if f["code"] == CODE]
    assert [f["model"] for f in flags] == ["teacher"]  # the student is fine
    assert "--mean/--std" in flags[0]["suggestion"]
    assert CODE in terminal and "--mean/--std" in terminal
    report = (out / "report.md").read_text()
    assert CODE in report and "--mean/--std" in report
    # without --strict the flag is shown but the exit code is the gates' (none here: 0)
    assert main([*argv, "--overwrite", "--no-report"]) == 0
    assert CODE in capsys.readouterr().out
