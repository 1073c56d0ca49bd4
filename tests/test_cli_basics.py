"""The CLI shell: fast --help without torch, help for every command, env, error handling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from robkd.cli.main import COMMANDS, main


def test_help_does_not_import_torch():
    code = (
        "import sys, io, contextlib\n"
        "from robkd.cli.main import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    rc = main(['--help'])\n"
        "assert rc == 0, rc\n"
        "assert 'audit' in buf.getvalue() and 'repair' in buf.getvalue()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"robkd {command}" in out and len(out) > 100


def test_expected_commands():
    assert {"audit", "repair", "train", "certify", "report", "demo", "env"} <= set(COMMANDS)


def test_env_json(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("robkd", "python", "torch", "torch_threads", "devices", "data", "auto_LiRPA"):
        assert key in info
    assert info["data"]["fashion-mnist-slice"]


def test_unknown_command_is_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv,why", [(["audit", "t.pt", "s.pt", "--n", "abc"], "invalid int value"),
                                      (["certify"], "required"), (["audit", "t.pt", "s.pt", "--norm", "L7"], "invalid choice")])
def test_bad_usage_is_one_line_and_exit_2(argv, why, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"robkd {argv[0]}: error:") and why in err[0], err


def test_python_m_robkd_entry_point():
    out = subprocess.run([sys.executable, "-m", "robkd", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("robkd ")


@pytest.mark.parametrize("argv", [["--help"], ["audit", "--help"], ["repair", "--help"], ["report", "--help"]])
def test_help_shows_the_one_exit_code_table(argv, capsys):
    """Every --help ends with the exit-code table of robkd.errors, and the README holds the same codes."""
    import re
    from pathlib import Path

    from robkd import errors

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(errors.EXIT_CODES_HELP.rstrip())
    codes = [int(c) for c in re.findall(r"^  (\d+) ", errors.EXIT_CODES_HELP, flags=re.M)]
    assert codes == [errors.EXIT_OK, errors.EXIT_GATE_FAILED, errors.EXIT_BAD_INPUT, errors.EXIT_SANITY,
                     errors.EXIT_INTERNAL, errors.EXIT_INTERRUPTED]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("Exit codes, the same for every command"):].split("\n\n")[1]
    assert [int(c) for c in re.findall(r"^\| (\d+) \|", table, flags=re.M)] == codes
