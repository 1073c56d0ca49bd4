"""Sharded audits under torchrun (2 gloo processes on 127.0.0.1) equal the single-process audit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robkd.cli.main import main
from robkd.distributed.launch import free_port, strip_launcher_args, torchrun_command, torchrun_safe_args

# n = 61 with batches of 16: the shards (31 + 30 samples) batch differently from the single process
ARGS = ["--data", "fashion-mnist-slice", "-n", "61", "--eps", "0.02,0.1", "--attacks", "fgsm,pgd-3x2",
        "--batch-size", "16", "--seed", "3", "--no-report", "--certify", "crown", "--llm", "--llm-steps", "3"]
GATE = ["--gate", "student.worst@0.1 >= 0.99"]  # fails: the exit code must come back through the launcher


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", ROBKD_NO_PROGRESS="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, trained_cnn, trained_mlp):
    from robkd.models import save_model

    d = tmp_path_factory.mktemp("dist_models")
    save_model(trained_cnn, d / "teacher.safetensors")
    save_model(trained_mlp, d / "student.safetensors")
    return d / "teacher.safetensors", d / "student.safetensors"


@pytest.fixture(scope="module")
def audits(tmp_path_factory, model_files):
    """The same audit by one process (in-process CLI) and by 2 processes (robkd audit --launcher torchrun)."""
    root = tmp_path_factory.mktemp("dist_audits")
    t, s = (str(p) for p in model_files)
    single = root / "single"
    # the same thread count as each torchrun worker (OMP_NUM_THREADS=1): on some CPUs the float
    # reductions of the Proposition-2 and LLM terms round differently with 1 and 2 threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc_single = main(["audit", t, s, *ARGS, *GATE, "--out", str(single)])
    finally:
        torch.set_num_threads(threads)
    sharded = root / "sharded"
    proc = subprocess.run(
        [sys.executable, "-m", "robkd", "audit", t, s, *ARGS, *GATE, "--out", str(sharded),
         "--launcher", "torchrun", "--nproc-per-node", "2"],
        env=_env(), capture_output=True, text=True, timeout=150,
    )
    return {"single": single, "sharded": sharded, "rc_single": rc_single, "proc": proc, "models": (t, s), "root": root}


def _numbers(d: dict) -> dict:
    return {k: d[k] for k in ("teacher", "student", "transfer", "gates", "gates_passed", "data", "radii",
                              "cascade_order", "exit_code", "sanity", "prop2")}


def _strip_timings(d: dict) -> dict:
    d = json.loads(json.dumps(d))
    for role in ("teacher", "student"):
        d[role].pop("timings", None)
    return d


def test_sharded_audit_equals_single_process(audits):
    proc = audits["proc"]
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # the failed gate, relayed
    assert audits["rc_single"] == 1
    a = json.loads((audits["single"] / "results.json").read_text())
    b = json.loads((audits["sharded"] / "results.json").read_text())
    na, nb = _strip_timings(_numbers(a)), _strip_timings(_numbers(b))
    assert nb == na, [k for k in na if na[k] != nb[k]]
    assert b["distributed"]["world_size"] == 2 and b["distributed"]["backend"] == "gloo"
    # certification ran on the shards, Proposition 2 on rank 0: both are in the comparison above
    assert b["teacher"]["certification"]["status"] == "ok" and b["prop2"]["per_radius"]
    assert "distributed" not in a
    assert "--launcher" not in b["command"] and "--nproc-per-node" not in b["command"]
    # the numbers are not trivial: attacks broke samples of both models, through both attacks of the cascade
    for role in ("teacher", "student"):
        worst = [r["worst"]["k"] for r in a[role]["per_radius"]]
        assert a[role]["clean"]["k"] > worst[-1]
    from safetensors.torch import load_file

    ta, tb = load_file(str(audits["single"] / "samples.safetensors")), load_file(str(audits["sharded"] / "samples.safetensors"))
    assert sorted(ta) == sorted(tb)
    for k in ta:  # per-sample outcomes and adversarial examples, bit for bit
        assert torch.equal(ta[k].nan_to_num(-1.0), tb[k].nan_to_num(-1.0)), k
    # pgd (random starts) broke samples that fgsm did not (9 of them on this CPU; radius 0.1 keeps it well
    # above one, so training's last-bit differences between CPUs cannot make the comparison vacuous)
    assert int((ta["student.broken_by"] == 1).sum() + (ta["teacher.broken_by"] == 1).sum()) >= 3
    # each rank kept its own resume state
    state = audits["sharded"] / "state"
    assert json.loads((state / "layout.json").read_text()) == {"world_size": 2}
    for k in (0, 1):
        fp = json.loads((state / f"rank{k}" / "fingerprint.json").read_text())
        assert fp["rank"] == k and fp["world_size"] == 2
        assert (state / f"rank{k}" / "suite-student.safetensors").is_file()


def test_resume_per_shard_and_world_size_mismatch(audits, capsys):
    t, s = audits["models"]
    work = audits["root"] / "resume"
    shutil.copytree(audits["sharded"], work)
    # one process cannot resume a 2-process audit (its state is per shard)
    rc = main(["audit", t, s, *ARGS, "--out", str(work), "--resume"])
    assert rc == 2 and "resume it with 2 process(es)" in capsys.readouterr().err
    # rank 1 lost its student state: it recomputes that, everything else is picked up
    (work / "state" / "rank1" / "suite-student.safetensors").unlink()
    (work / "results.json").unlink()
    cmd = torchrun_command(["audit", t, s, *ARGS, "--out", str(work), "--resume"], 2, port=free_port())
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads((work / "results.json").read_text())
    assert sorted(d["resumed"]) == sorted(f"teacher:{a}@{r}" for a in ("fgsm", "pgd-3x2") for r in ("0.02", "0.1"))
    ref = json.loads((audits["single"] / "results.json").read_text())
    for role in ("teacher", "student"):
        assert d[role]["per_radius"] == ref[role]["per_radius"]
    assert d["transfer"] == ref["transfer"]


def test_launcher_flags_are_validated(model_files, capsys, tmp_path):
    t, s = (str(p) for p in model_files)
    assert main(["audit", t, s, *ARGS, "--nproc-per-node", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--launcher torchrun" in capsys.readouterr().err
    assert main(["audit", t, s, *ARGS, "--launcher", "torchrun", "--nproc-per-node", "0"]) == 2
    assert "nproc-per-node" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_torchrun_command_line():
    argv = ["audit", "a.pt", "b.pt", "--n", "5", "--launcher", "torchrun", "--nproc-per-node=3", "--n=7", "--out", "o"]
    stripped = strip_launcher_args(argv)
    assert stripped == ["audit", "a.pt", "b.pt", "--n", "5", "--n=7", "--out", "o"]
    assert torchrun_safe_args(stripped) == ["audit", "a.pt", "b.pt", "--num-samples", "5", "--num-samples=7", "--out", "o"]
    cmd = torchrun_command(stripped, 3, port=1234, python="py")
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    i = cmd.index("--nproc-per-node")
    assert cmd[i + 1] == "3"
    assert cmd[cmd.index("--master-addr") + 1] == "127.0.0.1" and cmd[cmd.index("--master-port") + 1] == "1234"
    assert cmd[cmd.index("-m", 3) + 1] == "robkd"
    # torchrun's own parser accepts it (the script arguments reach robkd untouched)
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(cmd[3:])
    assert parsed.module and parsed.training_script == "robkd"
    assert parsed.training_script_args == torchrun_safe_args(stripped)
    with pytest.raises(SystemExit):  # why --n must be rewritten
        get_args_parser().parse_args(["--nproc-per-node", "2", "-m", "robkd", "audit", "--n", "5"])


@pytest.mark.parametrize("failing_rank", [1, 0])
def test_an_error_on_one_rank_ends_the_launch_at_once_with_its_exit_code(model_files, tmp_path, failing_rank):
    """A bad-input error on a single rank (injected here through sitecustomize) must not leave the job
    waiting for the collective timeout: that rank prints its error and exits, torchrun stops the other,
    and `--launcher torchrun` returns the error's exit code (2), not "gate failed"."""
    import time

    t, s = (str(p) for p in model_files)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        f"if os.environ.get('RANK') == '{failing_rank}':\n"
        "    import robkd.auditing.stages as stages\n"
        "    from robkd.errors import UsageError\n"
        "    def _boom(*a, **k):\n"
        "        raise UsageError('injected failure on this rank')\n"
        "    stages.run_suite = _boom\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(hook)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["ROBKD_DIST_TIMEOUT_S"] = "120"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "robkd", "audit", t, s, *ARGS, "--out", str(tmp_path / "o"),
                           "--launcher", "torchrun", "--nproc-per-node", "2"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "injected failure on this rank" in proc.stderr
    assert time.monotonic() - start < 100  # well before the collective timeout
