"""AuditConfig: defaults < spec file < overrides, unknown keys, value validation, the example spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from robkd.auditing.config import AuditConfig, read_spec
from robkd.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(text)
    return p


def test_precedence_defaults_spec_overrides(tmp_path):
    spec = write(tmp_path, 'data = "fashion-mnist-slice"\nn = 300\nseed = 4\neps = "0.05,0.1"\n'
                           'attacks = ["fgsm", "pgd-5"]\nbatch-size = 32\ngates = ["student.clean >= 0.5"]\n')
    cfg = AuditConfig.from_spec(spec)
    assert (cfg.data, cfg.n, cfg.seed, cfg.batch_size) == ("fashion-mnist-slice", 300, 4, 32)
    assert cfg.eps == [0.05, 0.1] and cfg.attacks == ["fgsm", "pgd-5"]
    assert cfg.norm == "Linf" and cfg.gate_on == "lower"  # defaults kept
    cfg = AuditConfig.from_spec(spec, n=64, eps="1/255,2/255,...,4/255", attacks="fgsm", gates=["student.clean >= 0.1"], seed=None)
    assert cfg.n == 64 and cfg.seed == 4  # None means "not given": the file's value stays
    assert cfg.eps == pytest.approx([1 / 255, 2 / 255, 3 / 255, 4 / 255])
    assert cfg.attacks == ["fgsm"] and cfg.gates == ["student.clean >= 0.1"]


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown key.*epsilon"):
        AuditConfig.from_spec(write(tmp_path, "epsilon = 0.1\n"))
    with pytest.raises(UsageError, match="unknown key.*bogus"):
        AuditConfig.from_spec(None, bogus=1)
    with pytest.raises(UsageError, match="unknown key"):
        AuditConfig.from_spec(write(tmp_path, "[models]\nteacher = 'a.pt'\n"))


@pytest.mark.parametrize(
    "text",
    ["n = 0\n", "n = -5\n", 'n = "many"\n', "eps = \"abc\"\n", "eps = []\n", "eps = 0\n", 'norm = "L3"\n',
     'attacks = []\n', 'attacks = ["fgsm", "fgsm"]\n', 'gate_on = "upper"\n', 'certify = "milp-ish"\n',
     'llm = "yes"\n', 'split = "dev"\n', "batch_size = 0\n", 'input_shape = "1,28"\n', "n = 1.5\n",
     'attacks = "fgsm,,pgd-5"\n'],
)
def test_bad_values(tmp_path, text):
    with pytest.raises(UsageError):
        AuditConfig.from_spec(write(tmp_path, text))


def test_bad_files(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        read_spec(tmp_path / "missing.toml")
    with pytest.raises(UsageError, match="not valid TOML"):
        read_spec(write(tmp_path, "n = = 3\n"))


def test_example_spec_is_valid():
    cfg = AuditConfig.from_spec(REPO / "audits" / "fashion-mnist-quick.toml")
    assert cfg.data == "fashion-mnist" and cfg.eps and cfg.attacks
    from robkd.auditing.gates import parse_gate, validate_gate

    for g in cfg.gates:
        validate_gate(parse_gate(g), radii=cfg.eps, attacks=cfg.attacks, certified=cfg.certify is not None)


def test_model_kwargs_role_arch_overrides():
    cfg = AuditConfig.from_spec(None, arch="robkd:mlp", student_arch="robkd:cnn_small", mean=[0.5], std="0.25")
    assert cfg.model_kwargs("teacher")["arch"] == "robkd:mlp"
    assert cfg.model_kwargs("student")["arch"] == "robkd:cnn_small"
    assert cfg.model_kwargs("student")["mean"] == (0.5,) and cfg.model_kwargs("student")["std"] == (0.25,)
